"""GRPO updates on fixed rollouts, run by test_distributed.py under torchrun or as one process.

    python tests/ddp_worker.py MODEL_DIR OUT_PREFIX LOSS_TYPE ACCUMULATION SHARED_PREFIX(0|1) FSDP(0|1)

Every process builds the same global batch from a seed and trains on its rank's share; each rank
saves its final weights to OUT_PREFIX.rank{r}.pt (under FSDP2 rank 0 saves the gathered weights).
"""
import math
import sys

import torch

import checkpoint
import data
import distributed
import grpo
import train_grail as tg

N_PROMPTS, G, PROMPT_LEN, COMPLETION_LEN = 4, 3, 9, 6
LEARNING_RATE = 1e-3  # plain SGD: the weights move by about 1e-2, far above the 1e-5 the test allows


def global_batch(step, vocab):
    """Rollouts of N_PROMPTS prompts: left-padded prompts, completions of different lengths, fixed
    advantages, generation-time and reference log-probs."""
    gen = torch.Generator().manual_seed(100 + step)
    prompt_ids = torch.randint(3, vocab, (N_PROMPTS, PROMPT_LEN), generator=gen)
    pad = torch.randint(0, 4, (N_PROMPTS,), generator=gen)
    prompt_mask = (torch.arange(PROMPT_LEN)[None] >= pad[:, None]).long()
    completion_ids = torch.randint(3, vocab, (N_PROMPTS * G, COMPLETION_LEN), generator=gen)
    lengths = torch.randint(1, COMPLETION_LEN + 1, (N_PROMPTS * G,), generator=gen)
    completion_mask = (torch.arange(COMPLETION_LEN)[None] < lengths[:, None]).long()
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
             "completion_mask": completion_mask}
    batch["advantages"] = torch.randn(N_PROMPTS * G, generator=gen)
    batch["old_logp"] = -torch.rand(N_PROMPTS * G, COMPLETION_LEN, generator=gen) * 5
    batch["ref_logp"] = -torch.rand(N_PROMPTS * G, COMPLETION_LEN, generator=gen) * 5
    return batch


def rank_rows(batch, world):
    prompts = torch.tensor(data.rank_share(list(range(N_PROMPTS)), world.rank, world.size))
    rows = torch.tensor([p * G + j for p in prompts.tolist() for j in range(G)])
    return {key: value[prompts] if key in grpo.PROMPT_KEYS else value[rows] for key, value in batch.items()}


def train(model_dir, loss_type, accumulation, shared_prefix, fsdp, world):
    """The final weights: each rank's own replica under DDP (to check that they agree), the gathered
    unsharded weights under FSDP2 (on rank 0). Plain SGD without clipping: AdamW and the gradient-norm
    clip are blind to a uniform gradient scale (a lost or extra x world size), an SGD step is not."""
    cfg = tg.Config(loss_type=loss_type, num_generations=G, max_completion_length=COMPLETION_LEN, beta=0.04,
                    num_iterations=2, max_steps=2, max_grad_norm=math.inf,
                    gradient_accumulation_steps=accumulation, epsilon_high=0.28, shared_prefix=shared_prefix,
                    fsdp=fsdp)
    model = checkpoint.load_model(model_dir, world.device, trainable=True)
    policy = distributed.wrap(grpo.Policy(model, cfg.shared_prefix), model, cfg.fsdp, world)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    for step in range(cfg.max_steps):
        grpo.update(policy, optimizer, scheduler, rank_rows(global_batch(step, model.config.vocab_size), world),
                    cfg, world)
    return checkpoint.full_state_dicts(model, optimizer)[0] if fsdp else model.state_dict()


def main(model_dir, out_prefix, loss_type, accumulation=1, shared_prefix=True, fsdp=False):
    world = distributed.setup(timeout_minutes=5)
    state = train(model_dir, loss_type, accumulation, shared_prefix, fsdp, world)  # frees the DDP wrapper
    if world.rank == 0 or not fsdp:
        torch.save(state, f"{out_prefix}.rank{world.rank}.pt")
    distributed.shutdown(wait_for_peers=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6] == "1")
