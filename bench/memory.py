"""Activation memory of the shared-prefix training forward+backward, with and without activation
checkpointing, for a recipe's model shape (a script, not a test; random weights, no download).

    python -m bench.memory [--shape=qwen2.5-1.5b] [--prompt_tokens=1536] [--completion_tokens=512]
                           [--generations=4] [--prompts=2] [--gpu_gb=80]     # from the repository root

The peak of live tensors is counted by torch's MemTracker (every tensor the ops create, whatever the
device), under bf16 autocast as on a GPU. Full depth would not fit this CPU's time budget, so it
runs the real width with 1 and 2 decoder layers, one prompt each: the difference is the cost of one
layer, the rest is the fixed part (embeddings, LM head over the completion positions, log-softmax).
The estimate for the recipe's micro-batch is fixed + layers × per-layer, times its prompts, beside
the fp32 weights, gradients, AdamW moments, DDP's gradient buckets and the beta > 0 reference model.
"""
import json
import sys

import torch

import errors
import grpo
from bench.steps import parse_options

SHAPES = {  # config.json of each model; vocab and tying matter for the LM head
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}
GB = 2 ** 30


def parse_args(argv):
    return parse_options(argv, {"shape": "qwen2.5-1.5b", "prompt_tokens": 1536, "completion_tokens": 512,
                                "generations": 4, "prompts": 2, "gpu_gb": 80.0, "beta": 0.04})


def build_model(shape, layers, checkpointing):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**{**SHAPES[shape], "num_hidden_layers": layers}, max_position_embeddings=32768)
    model = Qwen2ForCausalLM(config)  # fp32 master weights, as the trainer loads them
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def peak_activation_bytes(model, args):
    """Peak bytes of live tensors other than parameters and gradients during one prompt's fwd+bwd."""
    from torch.distributed._tools.mem_tracker import MemTracker

    P, C, G = args["prompt_tokens"], args["completion_tokens"], args["generations"]
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batch = {"prompt_ids": torch.randint(0, vocab, (1, P), generator=gen), "prompt_mask": torch.ones(1, P),
             "completion_ids": torch.randint(0, vocab, (G, C), generator=gen),
             "completion_mask": torch.ones(G, C, dtype=torch.long)}
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker, torch.autocast("cpu", dtype=torch.bfloat16):
        logp = grpo.completion_logprobs(model, batch, temperature=1.0)
        logp.float().mean().backward()
    peak = tracker.get_tracker_snapshot("peak")
    total = sum(stats["Total"] for stats in peak.values())
    held = sum(stats.get(kind, 0) for stats in peak.values() for kind in ("Parameter", "Gradient", "Buffer"))
    return total - held


def run(args):
    layers = SHAPES[args["shape"]]["num_hidden_layers"]
    one_layer = build_model(args["shape"], 1, False)
    params = sum(p.numel() for p in one_layer.parameters()) + (layers - 1) * sum(
        p.numel() for p in one_layer.model.layers[0].parameters())
    state = {"weights": 4 * params, "gradients": 4 * params, "adamw": 8 * params, "ddp_buckets": 4 * params,
             "reference": 4 * params if args["beta"] else 0}
    result = {"device": "cpu, bf16 autocast (tensor bytes as on a GPU)", "torch": torch.__version__, **args,
              "params": params, "state_gb": {k: round(v / GB, 2) for k, v in state.items()}}
    for checkpointing in (False, True):
        one = peak_activation_bytes(build_model(args["shape"], 1, checkpointing), args)
        two = peak_activation_bytes(build_model(args["shape"], 2, checkpointing), args)
        per_layer, fixed = two - one, 2 * one - two
        activations = args["prompts"] * (fixed + layers * per_layer)
        total = activations + sum(state.values())
        result["checkpointing" if checkpointing else "no_checkpointing"] = {
            "per_layer_mb": round(per_layer / 2 ** 20, 1), "fixed_mb": round(fixed / 2 ** 20, 1),
            "micro_batch_activations_gb": round(activations / GB, 2), "total_gb": round(total / GB, 2),
            "fits_gpu": total / GB <= args["gpu_gb"]}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    errors.run(lambda argv: run(parse_args(argv)), sys.argv[1:])
