"""Rollout and training throughput, and MFU, on a random-init Qwen2.5-shaped model (a script, not a
test; it needs no download: the weights are random and the prompts random token ids).

    python -m bench.gpu [--shape=qwen2.5-0.5b|qwen2.5-1.5b|tiny] [--prompts=8] [--generations=8] [--prompt_tokens=1024]
                        [--new_tokens=64] [--runs=3] [--checkpointing=0] [--peak_tflops=0] [--micro_batches=1]

One warm-up, then the median of `runs`, each phase on the same batch:
  rollout  shared-prefix prefill + sampling of exactly `new_tokens` per sample (no stop token)
  train    shared-prefix forward+backward in bf16 autocast over `micro_batches` chunks of the prompts
           (gradient accumulation, as the trainer's), plus the fused AdamW step
MFU counts model FLOPs only: per token 2·(decoder matmul parameters) forward and 3× that for
forward+backward, the attention scores and values (4·layers·hidden per attended key, forward), and
the LM head where logits are taken. Recomputation under checkpointing is not counted. Peak is the
bf16 dense peak of the card (H100/H200: 989 TFLOP/s) unless --peak_tflops says otherwise; the head
computes in fp32 (as the trainer's does), so its FLOPs count against the bf16 peak all the same.
Then, on the same batch and device, the largest gap between the shared-prefix log-probs the trainer
uses and the naive full-sequence ones (fp32 and bf16 autocast): the CPU tests' equality, on the GPU.
`--shape=tiny` runs the same code on a CPU in seconds (the test of this script). `--shape=qwen2.5-1.5b`
is the recipes' model (`--prompts=1 --generations=4 --prompt_tokens=1536 --new_tokens=512` is one of
their micro-batches; its peak memory is bench.memory's estimate to check).
"""
import json
import statistics
import sys
import time

import torch

import checkpoint
import distributed
import errors
import grpo
import rollout
import train_grail as tg
from bench import memory
from bench.steps import parse_options

SHAPES = {  # config.json of each model (the recipes' 1.5B from bench.memory); tiny only checks the script
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    **memory.SHAPES,
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def parse_args(argv):
    return parse_options(argv, {"shape": "qwen2.5-0.5b", "prompts": 8, "generations": 8, "prompt_tokens": 1024,
                                      "new_tokens": 64, "runs": 3, "checkpointing": 0, "peak_tflops": 0.0,
                                      "micro_batches": 1})


def build_model(shape, device, checkpointing):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, bos_token_id=None, eos_token_id=None)
    with torch.device(device):  # initialised where it runs: a 1.5B model's init on the host takes minutes
        model = Qwen2ForCausalLM(config)  # fp32 master weights, as train_grail loads them
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpoint.cast_lm_head_to_fp32(model)  # as checkpoint.load_model installs it (cast_lm_head_to_fp32)
    return model


def matmul_params(model):
    """Parameters of the decoder layers' matrices (2 FLOPs each per token forward)."""
    return sum(p.numel() for name, p in model.model.layers.named_parameters() if p.dim() == 2)


def forward_flops(model, prompt_tokens, completion_tokens, generations, logits):
    """Model FLOPs of one forward over a prompt and its G completions (tree attention)."""
    cfg = model.config
    tokens = prompt_tokens + generations * completion_tokens
    attended = prompt_tokens * (prompt_tokens + 1) / 2 + generations * (
        completion_tokens * prompt_tokens + completion_tokens * (completion_tokens + 1) / 2)
    return (2 * matmul_params(model) * tokens + 4 * cfg.num_hidden_layers * cfg.hidden_size * attended
            + 2 * cfg.hidden_size * cfg.vocab_size * logits)


def median_seconds(fn, runs, device):
    def timed():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed()  # warm-up
    return statistics.median(timed() for _ in range(runs))


def max_logprob_gap(model, batch, temperature, bf16):
    """max |shared-prefix - full-sequence| per-token log-prob over the completions, on this device:
    the tree-masked forward the trainer uses against the naive one it is tested against on the CPU."""
    def logprobs(shared_prefix):  # one prompt (and its G samples) at a time, as the trainer's passes
        return torch.cat([grpo.completion_logprobs(model, chunk, temperature, shared_prefix)
                          for chunk in grpo.micro_batches(batch, batch["prompt_ids"].shape[0])])

    with torch.no_grad(), torch.autocast(batch["prompt_ids"].device.type, torch.bfloat16, enabled=bf16):
        return float((logprobs(True) - logprobs(False)).abs().max())


def peak_tflops(args, device):
    if args["peak_tflops"]:
        return args["peak_tflops"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else ""
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), 0.0)


def run(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args["shape"], device, args["checkpointing"])
    B, G, P, C = args["prompts"], args["generations"], args["prompt_tokens"], args["new_tokens"]
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(0, model.config.vocab_size, (B, P), generator=gen).to(device)
    prompt_mask = torch.ones_like(prompt_ids)
    cfg = tg.Config(max_steps=1000, learning_rate=1e-6, bf16=True)
    world = distributed.single_process(device)
    completions = {}

    def do_rollout():
        model.eval()
        with distributed.autocast(world.device, cfg.bf16):
            completions["ids"] = rollout.sample(model, prompt_ids, prompt_mask, G, C, stop_ids=[], pad_id=0)

    rollout_s = median_seconds(do_rollout, args["runs"], device)
    assert completions["ids"].shape == (B * G, C), completions["ids"].shape
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completions["ids"],
             "completion_mask": torch.ones_like(completions["ids"])}
    optimizer, _ = grpo.make_optimizer(model, cfg)

    def do_train():
        model.train()
        chunks = list(grpo.micro_batches(batch, args["micro_batches"]))  # gradient accumulation, as the trainer
        for chunk in chunks:
            with distributed.autocast(world.device, cfg.bf16):
                logp = grpo.completion_logprobs(model, chunk, cfg.temperature)
            (logp.float().mean() / len(chunks)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_s = median_seconds(do_train, args["runs"], device)
    peak_memory_gb = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    model.eval()
    gaps = {f"max_abs_logp_gap_shared_vs_full_{name}": max_logprob_gap(model, batch, cfg.temperature, bf16)
            for name, bf16 in (("fp32", False), ("bf16", True))}
    # Rollout: one prefill of each prompt, then G·C decoded tokens attending to the prompt and their own past.
    rollout_flops = B * forward_flops(model, P, C, G, logits=G * C)
    train_flops = 3 * B * forward_flops(model, P, C, G, logits=G * C)
    peak = peak_tflops(args, device)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        **args, "decoder_matmul_params": matmul_params(model),
        "rollout_s": rollout_s, "rollout_generated_tokens_per_s": B * G * C / rollout_s,
        "rollout_tflops": rollout_flops / rollout_s / 1e12,
        "train_s": train_s, "train_tokens_per_s": B * (P + G * C) / train_s,
        "train_tflops": train_flops / train_s / 1e12, "peak_tflops": peak,
        "peak_memory_gb": peak_memory_gb,
        **gaps,
    }
    if peak:
        result["rollout_mfu"] = result["rollout_tflops"] / peak
        result["train_mfu"] = result["train_tflops"] / peak
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    errors.run(lambda argv: run(parse_args(argv)), sys.argv[1:])
