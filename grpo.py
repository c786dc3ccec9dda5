"""GRPO maths and the policy update: group advantages, the clipped per-token loss with an optional k3
KL, the loss normaliser (global across ranks), the log-prob passes (the shared-prefix tree-masked
forward and the naive one it is tested against), the optimizer, and the statistics of a step.

A batch of rollouts is a dict of tensors: `prompt_ids`, `prompt_mask` [B, P] (left-padded), and one
row per sample (sample j of prompt i at row i*G + j): `completion_ids`, `completion_mask` [B*G, C],
`advantages` [B*G], and optionally `old_logp`, `ref_logp` [B*G, C].
"""
import dataclasses
import math
import statistics
from dataclasses import dataclass, field

import torch

import distributed
import rollout

PROMPT_KEYS = ("prompt_ids", "prompt_mask")  # [B, P]; every other batch tensor has one row per sample


# ---------------------------------------------------------------------------------------------
# Advantages and loss


def group_advantages(rewards_bg, scale_rewards, std_floor):
    """rewards [B, G] -> advantages [B, G]: reward minus its group mean, divided by the group std
    (`group`), by the std of the global batch (`batch`, all-reduced across ranks) or by 1 (`none`).
    A group whose rewards are all equal gets advantage 0."""
    centred = rewards_bg - rewards_bg.mean(dim=1, keepdim=True)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = rewards_bg.std(dim=1, keepdim=True)
    else:
        count = torch.tensor(float(rewards_bg.numel()), device=rewards_bg.device)
        sums = distributed.all_reduce_sum(torch.stack([rewards_bg.sum(), (rewards_bg ** 2).sum(), count]).double())
        mean = sums[0] / sums[2]
        var = (sums[1] - sums[2] * mean ** 2) / (sums[2] - 1).clamp_min(1)
        std = var.clamp_min(0).sqrt().to(rewards_bg.dtype)
    return centred / torch.clamp(std, min=std_floor)


def per_token(advantages):
    """[N] advantages (one per completion) or [N, C] (one per token) as [N, 1] or [N, C]."""
    return advantages if advantages.dim() == 2 else advantages[:, None]


def per_token_loss(logp, old_logp, ref_logp, advantages, epsilon, epsilon_high, beta):
    """Clipped importance-ratio objective per token (negated: a loss), plus beta * k3 KL.

    logp, old_logp, ref_logp: [N, C]; advantages: [N] (one per completion, GRPO) or [N, C] (per
    token: behaviour cloning's target weights). Returns (loss [N, C], kl [N, C] or None, clipped [N, C] bool)."""
    ratio = torch.exp(logp - old_logp)
    adv = per_token(advantages)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv
    loss = -torch.min(unclipped, clipped)
    is_clipped = clipped < unclipped
    kl = None
    if beta:
        log_ratio = ref_logp - logp
        kl = torch.exp(log_ratio) - log_ratio - 1  # k3: unbiased, always >= 0
        loss = loss + beta * kl
    return loss, kl, is_clipped


def loss_normaliser(loss_type, completion_mask, max_completion_length):
    """The denominator of the step's loss, summed over every rank and micro-batch, so the gradient
    of 2 ranks x B rows equals that of 1 rank x 2B rows."""
    mask = completion_mask.float()
    if loss_type == "dapo":
        local = mask.sum()
    elif loss_type == "dr_grpo":
        local = torch.tensor(mask.shape[0] * float(max_completion_length))
    else:  # grpo: each sequence's mean counts once
        local = torch.tensor(float(mask.shape[0]))
    return distributed.all_reduce_sum(local.to(completion_mask.device).double()).item()


def loss_numerator(token_loss, completion_mask, loss_type):
    mask = completion_mask.to(token_loss.dtype)
    if loss_type == "grpo":
        return ((token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).sum()
    return (token_loss * mask).sum()


# ---------------------------------------------------------------------------------------------
# Log-prob passes


def selective_log_softmax(logits, token_ids):
    """log p(token) without a full-vocabulary log-softmax copy for every row at once."""
    out = []
    for row_logits, row_ids in zip(logits, token_ids):  # one row at a time bounds peak memory
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(out)


def micro_batches(batch, n_micro):
    """Split by prompt (its G sample rows stay with it) into at most n_micro chunks."""
    n_prompts = batch["prompt_ids"].shape[0]
    G = batch["completion_ids"].shape[0] // n_prompts
    bounds = torch.linspace(0, n_prompts, min(n_micro, n_prompts) + 1).round().long().tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        yield {key: value[lo:hi] if key in PROMPT_KEYS else value[lo * G:hi * G] for key, value in batch.items()}


def full_sequence_logprobs(model, batch, temperature):
    """Per-token log-probs [N, C] from G full prompt+completion rows per prompt (the naive forward:
    each prompt is computed G times). The reference the shared-prefix forward is tested against."""
    G = batch["completion_ids"].shape[0] // batch["prompt_ids"].shape[0]
    completion_ids = batch["completion_ids"]
    input_ids = torch.cat([batch["prompt_ids"].repeat_interleave(G, 0), completion_ids], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"].repeat_interleave(G, 0), batch["completion_mask"]], dim=1)
    C = completion_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=rollout.mask_positions(attention_mask), logits_to_keep=C + 1, use_cache=False)
    return selective_log_softmax(out.logits[:, :-1] / temperature, completion_ids)


def tree_attention_mask(prompt_length, lengths, attn_implementation):
    """[1, 1, L, L] mask for one prompt followed by its G completions (lengths [G]): every token sees
    the prompt causally; a completion token also sees its own completion's earlier tokens, never
    another completion's."""
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"shared_prefix needs attn_implementation 'sdpa' or 'eager', not {attn_implementation!r} "
                         "(it passes a 4D tree mask); set shared_prefix=false")
    device = lengths.device
    block = torch.repeat_interleave(torch.arange(-1, len(lengths), device=device),
                                    torch.cat([lengths.new_tensor([prompt_length]), lengths]))
    position = torch.arange(len(block), device=device)
    allowed = (position[None, :] <= position[:, None]) & ((block[None, :] == -1) | (block[None, :] == block[:, None]))
    if attn_implementation == "eager":  # eager attention adds the mask to the scores
        allowed = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return allowed[None, None]


def shared_prefix_logprobs(model, batch, temperature):
    """Per-token log-probs [N, C] computing each prompt once: each prompt (unpadded) and its G
    completions (unpadded) run as one sequence under a tree mask, so autograd flows into the prompt
    once, with the sum of its G completions' gradients. No KV cache is involved, which keeps
    activation checkpointing usable."""
    C = batch["completion_ids"].shape[1]
    window = getattr(model.config, "sliding_window", None)
    out = []
    for group in micro_batches(batch, batch["prompt_ids"].shape[0]):  # one prompt and its G samples
        prompt = group["prompt_ids"][0][group["prompt_mask"][0].bool()]
        lengths = group["completion_mask"].sum(dim=1)  # the mask is a prefix: up to the stop token
        P = len(prompt)
        if window and P + int(lengths.max()) > window:  # the tree mask has no window: compute naively
            out.append(full_sequence_logprobs(model, group, temperature))
            continue
        device = prompt.device
        tokens = torch.cat([prompt] + [ids[:n] for ids, n in zip(group["completion_ids"], lengths.tolist())])
        positions = torch.cat([torch.arange(P, device=device)] +
                              [P + torch.arange(n, device=device) for n in lengths.tolist()])
        # Each completion token is predicted by the position before it; a completion's first token
        # by the prompt's last one.
        predictors = torch.arange(P, len(tokens), device=device) - 1
        predictors[(torch.cumsum(lengths, 0) - lengths)[lengths > 0]] = P - 1
        logits = model(input_ids=tokens[None], position_ids=positions[None], use_cache=False,
                       attention_mask=tree_attention_mask(P, lengths, model.config._attn_implementation),
                       logits_to_keep=predictors).logits
        flat = selective_log_softmax(logits / temperature, tokens[None, P:])[0]
        rows = torch.nn.utils.rnn.pad_sequence(list(flat.split(lengths.tolist())), batch_first=True)
        out.append(torch.nn.functional.pad(rows, (0, C - rows.shape[1])))
    return torch.cat(out)


def completion_logprobs(model, batch, temperature, shared_prefix=True):
    if shared_prefix:
        return shared_prefix_logprobs(model, batch, temperature)
    return full_sequence_logprobs(model, batch, temperature)


class Policy(torch.nn.Module):
    """The module DDP wraps: the shared-prefix forward makes one model call per prompt, and inside
    one module call DDP sees one forward per backward."""

    def __init__(self, model, shared_prefix):
        super().__init__()
        self.model = model
        self.shared_prefix = shared_prefix

    def forward(self, batch, temperature):
        return completion_logprobs(self.model, batch, temperature, self.shared_prefix)


def no_grad_logprobs(model, batch, cfg, world):
    """Log-probs of a frozen pass (old policy, reference), in the micro-batches of the update."""
    with torch.no_grad(), distributed.autocast(world.device, cfg.bf16, cfg.cpu_bf16):
        return torch.cat([completion_logprobs(model, chunk, cfg.temperature, cfg.shared_prefix)
                          for chunk in micro_batches(batch, cfg.gradient_accumulation_steps)])


# ---------------------------------------------------------------------------------------------
# The update


def cloning_batch(tokenizer, prompt_texts, targets, pad_id, device):
    """A batch whose completions are each prompt's target answers, each token's advantage its
    target's weight (0 before the target's first scored token): the update's gradient on it is that
    of sum_k weight_k log p(scored tokens of answer_k), a cross-entropy to the targets (behaviour
    cloning). `targets` holds a [(token ids, weight, first scored index)] list per prompt
    (choices.cloning_targets); shorter lists are padded with weight-0 copies so every prompt has as
    many completions."""
    width = max(len(t) for t in targets)
    targets = [t + [(t[0][0], 0.0, 0)] * (width - len(t)) for t in targets]
    prompt_ids, prompt_mask = rollout.encode_prompts(tokenizer, prompt_texts, device)
    tokens = [torch.tensor(ids) for t in targets for ids, _, _ in t]
    completion_ids = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True, padding_value=pad_id)
    columns = torch.arange(completion_ids.shape[1])[None]
    completion_mask = columns < torch.tensor([len(t) for t in tokens])[:, None]
    first = torch.tensor([start for t in targets for _, _, start in t])[:, None]
    weights = torch.tensor([w for t in targets for _, w, _ in t], dtype=torch.float32)[:, None]
    advantages = weights * ((columns >= first) & completion_mask)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids.to(device),
            "completion_mask": completion_mask.long().to(device), "advantages": advantages.to(device)}


def behaviour_cloning(policy, model, tokenizer, batches, cfg, world):
    """Maximum likelihood of given answers, one step per (prompt texts, targets) of `batches`
    (`cfg.bc_steps` of them; targets as in cloning_batch): the update with per-token advantages = the
    target weights on the targets' scored tokens (ratio 1, nothing clipped), whose gradient is that
    of the cross-entropy to the targets, with an AdamW and schedule of its own (`bc_learning_rate`,
    a linear warm-up over `bc_warmup_ratio` of the steps, then cosine to 0). The log-loss is a proper
    scoring rule: it fits the choice distribution, not its mode. Returns each step's {bc_step, loss: the
    cross-entropy per prompt (nats), lr, grad_norm}."""
    bc_cfg = dataclasses.replace(cfg, learning_rate=cfg.bc_learning_rate, max_steps=cfg.bc_steps,
                                 warmup_ratio=cfg.bc_warmup_ratio,
                                 num_iterations=1, beta=0.0, temperature=1.0, loss_type="dapo")
    optimizer, scheduler = make_optimizer(model, bc_cfg)
    end = rollout.stop_token_ids(model, tokenizer)[0]
    steps = []
    model.train()
    for prompt_texts, targets in batches:
        lr = optimizer.param_groups[0]["lr"]
        stats = update(policy, optimizer, scheduler, cloning_batch(tokenizer, prompt_texts, targets, end, world.device),
                       bc_cfg, world)
        totals = distributed.all_reduce_sum(torch.tensor([stats["weighted_logp_sum"], len(prompt_texts)],
                                                         device=world.device, dtype=torch.float64))
        steps.append({"bc_step": len(steps) + 1, "loss": -(totals[0] / totals[1]).item(), "lr": lr,
                      "grad_norm": stats.get("grad_norm")})
    return steps


def update(policy, optimizer, scheduler, batch, cfg, world):
    """One optimizer step per iteration on a batch of rollouts. `policy` is a Policy (DDP-wrapped
    under torchrun). Reads from cfg: num_iterations, gradient_accumulation_steps, temperature,
    epsilon, epsilon_high, beta, loss_type, max_completion_length, max_grad_norm, bf16.
    Returns the step's statistics."""
    normaliser = loss_normaliser(cfg.loss_type, batch["completion_mask"], cfg.max_completion_length)
    model = distributed.unwrap(policy).model
    stats = {"loss": 0.0, "kl_sum": 0.0, "clipped": 0.0, "tokens": 0.0, "logp_sum": 0.0, "weighted_logp_sum": 0.0,
             "skipped_updates": 0}
    for _ in range(cfg.num_iterations):
        chunks = list(micro_batches(batch, cfg.gradient_accumulation_steps))
        for i, chunk in enumerate(chunks):
            # Gradients are reduced across ranks only on the last micro-batch.
            with distributed.gradient_sync(policy, model, enabled=i == len(chunks) - 1):
                with distributed.autocast(world.device, cfg.bf16, cfg.cpu_bf16):
                    logp = policy(chunk, cfg.temperature)
                old = chunk["old_logp"] if "old_logp" in chunk else logp.detach()
                token_loss, kl, clipped = per_token_loss(logp, old, chunk.get("ref_logp"), chunk["advantages"],
                                                         cfg.epsilon, cfg.epsilon_high, cfg.beta)
                # DDP averages gradients over ranks; x world size turns that into the sum the global
                # normaliser expects.
                loss = loss_numerator(token_loss, chunk["completion_mask"], cfg.loss_type) / normaliser * world.size
                loss.backward()
            mask = chunk["completion_mask"].float()
            stats["loss"] += loss.item() / world.size
            stats["tokens"] += mask.sum().item()
            stats["clipped"] += (clipped.float() * mask).sum().item()
            token_logp = logp.detach().float() * mask
            logp_sums = torch.stack([token_logp.sum(), (per_token(chunk["advantages"]) * token_logp).sum()]).tolist()
            stats["logp_sum"] += logp_sums[0]
            stats["weighted_logp_sum"] += logp_sums[1]  # the cloning loss (advantages = target weights)
            if kl is not None:
                stats["kl_sum"] += (kl.detach() * mask).sum().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:  # a NaN/inf gradient would poison the weights: skip this update, keep the step count
            stats["skipped_updates"] += 1
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        stats["grad_norm"] = grad_norm.item()
    return stats


def make_optimizer(model, cfg):
    # fused: one kernel per step, without the parameter-sized temporaries of the per-tensor loop.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, fused=True)
    total = max(1, cfg.max_steps * cfg.num_iterations)
    warmup = int(cfg.warmup_ratio * total)

    def lr_factor(step):  # linear warm-up, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


# ---------------------------------------------------------------------------------------------
# Statistics of a step


@dataclass
class StepRecord:
    """One rank's share of a step: what its samples earned and what its update did. Every rank's
    record is gathered into one metrics.jsonl line by `step_metrics`."""
    rewards: list                 # total reward per sample
    components: dict              # {component: reward per sample}
    counts: dict                  # parse outcomes (rewards.score), summed over ranks
    advantages: list
    lengths: list                 # completion tokens per sample
    truncated: list               # no stop token within the budget, per sample
    prompt_tokens: int
    completion_tokens: int
    update: dict = field(default_factory=dict)  # `update`'s statistics
    disc: dict = None             # with GAIL: this rank's discriminator diagnostics (disc.policy_rewards)


def step_metrics(step, records, num_generations, lr, seconds):
    """One line of metrics.jsonl from every rank's StepRecord."""
    def cat(name):
        return [value for record in records for value in getattr(record, name)]

    def total(key):
        return sum(record.update[key] for record in records)

    out = {"step": step}
    for name in ["total"] + sorted(records[0].components):
        values = cat("rewards") if name == "total" else [v for r in records for v in r.components[name]]
        out[f"reward/{name}/mean"] = statistics.fmean(values)
        out[f"reward/{name}/std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    groups = torch.tensor(cat("rewards"), dtype=torch.float64).view(-1, num_generations)
    out["frac_reward_zero_std"] = (groups.std(dim=1) == 0).double().mean().item()
    out["advantage/abs_mean"] = statistics.fmean(map(abs, cat("advantages")))
    lengths = cat("lengths")
    out.update({"completion_length/mean": statistics.fmean(lengths), "completion_length/min": min(lengths),
                "completion_length/max": max(lengths), "truncated_frac": sum(cat("truncated")) / len(lengths)})
    tokens = total("tokens")
    out.update({"loss": total("loss"), "kl": total("kl_sum") / tokens if tokens else 0.0,
                "clip_ratio": total("clipped") / tokens if tokens else 0.0,
                "logp/mean": total("logp_sum") / tokens if tokens else 0.0,
                "grad_norm": records[0].update["grad_norm"], "lr": lr,
                "skipped_updates": records[0].update["skipped_updates"], "step_seconds": seconds,
                "tokens_per_second": sum(r.prompt_tokens + r.completion_tokens for r in records) / seconds})
    counts = {}
    for record in records:
        for key, value in record.counts.items():
            counts[key] = counts.get(key, 0) + value
    out.update({f"parse/{key}": value for key, value in sorted(counts.items())})
    return out
