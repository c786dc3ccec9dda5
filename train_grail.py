"""GRAIL trainer: GRPO on real recommendation-slate sessions, with the GAIL discriminator (disc.py)
mixed into the reward when GAIL_USE=1. Read top to bottom: the constants users edit, how overrides
apply, setup, the loop, main.

    python train_grail.py                                     # embedded default: SmolLM2-135M, bundled data
    torchrun --nproc_per_node 8 train_grail.py --config=recipes/grail_gun.yaml
    python train_grail.py --eval_only=CHECKPOINT_OR_ID --dataset=FILE_OR_ID --output_dir=DIR

Configuration, later sources winning: the defaults in `Config` below, `--config=FILE` (YAML or JSON),
GAIL_*/GRAIL_* environment variables, then `--key=value` arguments (configurator.py).
"""
import dataclasses
import math
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import checkpoint
import choices
import configurator
import data
import disc
import distributed
import errors
import evaluate
import grpo
import opinions
import prompts
import reports
import rewards
import rollout
import outputs


@dataclass
class Config:
    # --- model and data ---
    model_name_or_path: str = checkpoint.EMBEDDED_MODEL  # HF causal-LM id or folder (default: SmolLM2-135M, offline)
    dataset: str = ""             # hub id, save_to_disk folder, .jsonl/.json/.parquet files (comma-separated); '' = data/
    output_dir: str = "out/grail"  # the run folder (outputs.py): metrics, evaluations, completions, checkpoints
    prompt_mode: str = "think"    # think: upstream <think><answer><opinion> prompt | answer: the turn opens with <answer>
    system_prompt: str = ""       # '' = the default prompt of prompt_mode
    grail_max_history: int = 12   # most recent history entries in the prompt (0 = all); env GRAIL_MAX_HISTORY
    viewpoint_in_question: bool = False  # the opinion question repeats the initial viewpoint (off: upstream's)
    val_fraction: float = 0.1     # participants held out (per issue and study) when the dataset has no validation split
    shuffle_slates: bool = False  # permute each training slate (gold remapped), for content-only studies: which
    #                               slot people click is most of the behaviour, so a simulator keeps the order
    shared_prefix: bool = True    # compute each prompt once for its G samples (rollouts and training forward)
    # --- GRPO ---
    max_steps: int = 200          # <= 0: num_train_epochs passes over the training rows
    num_train_epochs: float = 1.0  # used only when max_steps <= 0 (upstream recipes set max_steps: -1)
    prompts_per_step: int = 16    # global: split across ranks (must divide by the world size), each sampled G times
    num_generations: int = 4      # G samples per prompt
    max_completion_length: int = 256  # new tokens per sample
    temperature: float = 1.0      # sampling temperature; the log-probs use the same
    top_p: float = 1.0            # nucleus sampling
    learning_rate: float = 1e-6   # AdamW peak learning rate
    beta: float = 0.0             # KL weight to the frozen reference (k3); 0 loads no reference model
    epsilon: float = 0.2          # lower clip: ratio >= 1 - epsilon
    epsilon_high: float = 0.2     # upper clip: ratio <= 1 + epsilon_high (DAPO uses 0.28)
    # grpo: mean over each sequence, then over sequences | dr_grpo: token sum / (sequences * max_completion_length)
    # | dapo: token sum / completion tokens; every denominator is global (all ranks, all micro-batches)
    loss_type: str = "dapo"       # grpo | dr_grpo | dapo
    num_iterations: int = 1       # optimizer steps per batch of rollouts (> 1 uses generation-time log-probs)
    scale_rewards: str = "group"  # advantage = (r - group mean) / std of the group | of the global batch | none
    std_floor: float = 1e-4       # the std is floored: a zero-spread group gets advantage 0, never a blow-up
    reward_funcs: list = field(default_factory=lambda: ["accuracy", "format"])  # upstream names are accepted
    reward_weights: list[float] = field(default_factory=lambda: [1.0, 0.2])  # one weight per reward function
    # --- GAIL discriminator (disc.py); every gail_* key is also read from its GAIL_* env var ---
    gail_use: bool = False        # mix the discriminator's reward into the GRPO reward (0 = pure GRPO, the baseline)
    gail_weight: float = 0.5      # base and disc rewards weighted (1, gail_weight), normalised to sum 1 (upstream)
    gail_alpha: float = 1.0       # r_disc = alpha * f(D)
    gail_reward: str = "prob"     # f: prob D (upstream) | logit: log D - log(1-D) | neglog: -log(1-D)
    gail_reward_clip: float = 5.0  # |r_disc| bound
    gail_disc_model: str = ""     # '' = built-in (policy embeddings + 2-layer encoder, width 128) | HF encoder id/folder
    gail_lr: float = 1e-4         # discriminator AdamW learning rate (upstream used 2e-5 for distilbert)
    gail_negatives: str = "all"   # all: every policy sample is a negative (GAIL) | wrong: only choices != gold (upstream)
    gail_disc_steps: int = 4      # discriminator updates per policy step (tabular bandit: 1 lets the policy outrun D)
    gail_disc_batch: int = 32     # pairs per update
    gail_human_fraction: float = 0.5  # share of human pairs in an update, the rest from the replay buffer
    gail_buffer_size: int = 2048  # recent policy pairs kept per rank
    gail_warmup_steps: int = 2    # discriminator-only steps before the first policy step, on the starting policy's samples
    gail_gradient_penalty: float = 0.0  # R1 weight on human states' input embeddings
    gail_label_smoothing: float = 0.0  # targets 1-eps for humans, eps for the policy
    # --- behaviour-cloning warm start (answer mode) ---
    bc_steps: int = 0             # steps of maximum likelihood on the human answers before GRPO (0 = none)
    bc_learning_rate: float = 1e-5  # its own AdamW, warm-up then cosine to 0 over bc_steps; prompts_per_step rows a step
    bc_warmup_ratio: float = 0.0  # linear warm-up share of the cloning steps, before the cosine
    bc_label_smoothing: float = 0.0  # target (1-eps) x the click + eps x the train split's position prior
    bc_opinion_smoothing: float = 0.0  # the opinion's: (1-eps) x the label + eps x its baseline:
    bc_opinion_prior: str = "issue"  # issue (direction prior) | index (pre-study-index logistic) | viewpoint (the initial viewpoint table)
    # --- optimisation ---
    gradient_accumulation_steps: int = 1  # micro-batches per rank per optimizer step (one normaliser for the step)
    warmup_ratio: float = 0.1     # linear warm-up share of the optimizer steps, then cosine to 0
    weight_decay: float = 0.0     # AdamW
    adam_beta1: float = 0.9       # AdamW
    adam_beta2: float = 0.99      # AdamW
    adam_epsilon: float = 1e-8    # AdamW
    max_grad_norm: float = 1.0    # gradient clipping; a non-finite norm skips the update
    gradient_checkpointing: bool = False  # keep each decoder layer's input, recompute the rest in backward
    fsdp: bool = False            # FSDP2 (fully_shard per decoder layer) instead of DDP, for models too big for DDP
    bf16: bool = True             # bf16 autocast on CUDA (weights and optimizer stay fp32)
    cpu_bf16: bool = False        # the same on CPU, evaluation too (pays where the CPU multiplies bf16 natively)
    cast_lm_head_to_fp32: bool = True  # TRL's: the output head in fp32 under autocast (logits not rounded to bf16)
    # --- evaluation, logging, checkpoints ---
    # When to evaluate: nothing unless asked, as in HF/TRL (an evaluation costs minutes; the recipes ask)
    eval_on_start: bool = False   # the untrained model first (its scores then stand beside every later one)
    eval_steps: int = 0           # every N steps; 0 = no periodic evaluation
    eval_on_end: bool = False     # after the last step
    eval_max_rows: int = 0        # 0 = the whole split: a seeded sample of this many rows otherwise
    eval_split: str = "validation"  # validation | train | all: the rows evaluated
    eval_views: list = field(default_factory=lambda: list(evaluate.VIEWS))  # original, shuffled, cue_neutral
    eval_samples: int = 8         # K sampled answers per row (temperature 1) for simulation quality; 0 = off
    eval_batch_size: int = 16     # prompts per evaluation generation batch (each with its samples)
    eval_only: str = ""           # a checkpoint folder or hub id: evaluate it and exit
    eval_cache: bool = True       # reuse exact distributions of unchanged model files (GRAIL_CACHE/evals)
    log_completions_steps: int = 10  # write sample completions every N steps
    save_steps: int = 50          # checkpoint every N steps and at the end (0 = at the end only)
    save_total_limit: int = 3     # checkpoints kept in output_dir
    resume: bool = True           # continue from the newest complete checkpoint in output_dir
    lock_wait_seconds: int = 0    # one process per output_dir: wait this long for its holder to exit (run.sh requeues)
    seed: int = 42                # data order, slate shuffles, (plus the rank) sampling, and the split unless split_seed
    split_seed: int = -1          # the participant split and the evaluated rows alone; -1 = seed. Several seeds on
                                  # one split_seed measure the run-to-run noise on one held-out set
    dist_timeout_minutes: int = 60  # process-group timeout: long generations on one rank can be slow
    grail_stop_file: str = ""     # env GRAIL_STOP_FILE: when this file appears, checkpoint and exit 99 (run.sh under SLURM)
    report_to: list = field(default_factory=list)  # tensorboard and/or wandb (TRL's option; none = []), rank 0


# What the opinion's cloning target is smoothed toward: row -> P(direction), fit on the training split.
OPINION_BASELINES = {"issue": opinions.direction_prior, "index": opinions.index_baseline,
                     "viewpoint": opinions.viewpoint_baseline}

PREEMPTED_EXIT_CODE = 99  # "checkpointed on request, requeue me"; run.sh requeues the SLURM job on it


# Keys that may change when a run resumes (schedules, logging, memory layout); any other difference
# from the run's config.json is another experiment, and resuming refuses it.
RESUMABLE_KEYS = {
    "max_steps", "num_train_epochs", "eval_on_start", "eval_steps", "eval_on_end", "eval_max_rows", "eval_split",
    "eval_views", "eval_samples", "eval_batch_size", "log_completions_steps", "save_steps", "save_total_limit",
    "resume", "lock_wait_seconds", "eval_cache", "dist_timeout_minutes", "grail_stop_file", "report_to", "output_dir",
    "gradient_checkpointing", "gradient_accumulation_steps", "shared_prefix", "fsdp",
}


def parse_config(argv, environ):
    """The effective Config and the ignored recipe keys. `--eval_only` scores a checkpoint with the
    prompt it was trained with, into a folder of its own, unless told otherwise."""
    cfg, ignored = configurator.apply_overrides(Config, argv, environ)
    checkpoint.check_model_name(cfg.eval_only or cfg.model_name_or_path)
    if cfg.eval_only:  # its prompt and split outrank a recipe file and an exported GRAIL_MAX_HISTORY
        pinned = {**checkpoint.eval_settings(cfg.eval_only), "output_dir": outputs.eval_folder(cfg.eval_only)}
        cfg, ignored = configurator.apply_overrides(Config, argv, environ, pinned)
    try:
        cfg.reward_funcs = rewards.canonical_reward_names(cfg.reward_funcs)
    except ValueError as err:
        raise SystemExit(f"[config] {err}") from None
    cfg.report_to = [name for name in cfg.report_to if name != "none"]
    check_config(cfg, int(environ.get("WORLD_SIZE", 1)))
    if cfg.gail_use and cfg.gail_disc_model:  # a missing encoder fails now, not after the policy has loaded
        checkpoint.check_model_name(cfg.gail_disc_model)
    return cfg, ignored


# The valid range of every numeric key: (low, high, whether low itself is allowed). Checked before
# anything loads, so a value that generate or the optimizer would reject later fails in one line now.
RANGES = {
    "temperature": (0, None, False), "top_p": (0, 1, False), "max_completion_length": (1, None, True),
    "grail_max_history": (0, None, True), "val_fraction": (0, 1, True), "num_train_epochs": (0, None, False),
    "prompts_per_step": (1, None, True), "num_generations": (2, None, True), "learning_rate": (0, None, False),
    "beta": (0, None, True), "epsilon": (0, 1, True), "epsilon_high": (0, None, True), "num_iterations": (1, None, True),
    "std_floor": (0, None, False), "gail_weight": (0, None, True), "gail_reward_clip": (0, None, False),
    "gail_lr": (0, None, False), "gail_disc_steps": (0, None, True), "gail_disc_batch": (1, None, True),
    "gail_human_fraction": (0, 1, True), "gail_buffer_size": (1, None, True), "gail_warmup_steps": (0, None, True),
    "gail_gradient_penalty": (0, None, True), "gail_alpha": (0, None, True), "gail_label_smoothing": (0, 0.5, True),
    "bc_steps": (0, None, True),
    "bc_learning_rate": (0, None, False), "bc_warmup_ratio": (0, 1, True), "bc_label_smoothing": (0, 1, True),
    "bc_opinion_smoothing": (0, 1, True), "gradient_accumulation_steps": (1, None, True), "warmup_ratio": (0, 1, True),
    "weight_decay": (0, None, True), "adam_beta1": (0, 1, True), "adam_beta2": (0, 1, True),
    "adam_epsilon": (0, None, False), "max_grad_norm": (0, None, False), "eval_steps": (0, None, True),
    "eval_max_rows": (0, None, True), "eval_samples": (0, None, True), "eval_batch_size": (1, None, True),
    "log_completions_steps": (0, None, True), "save_steps": (0, None, True), "save_total_limit": (1, None, True),
    "dist_timeout_minutes": (1, None, True), "lock_wait_seconds": (0, None, True), "split_seed": (-1, None, True),
}


def check_config(cfg, world_size=1):
    choices = {"prompt_mode": ("think", "answer"), "loss_type": ("grpo", "dr_grpo", "dapo"),
               "scale_rewards": ("group", "batch", "none"), "eval_split": ("validation", "train", "all"),
               "gail_reward": tuple(disc.REWARD_FORMS), "gail_negatives": ("all", "wrong"),
               "report_to": ("tensorboard", "wandb"), "bc_opinion_prior": tuple(OPINION_BASELINES)}
    for key, allowed in choices.items():
        values = getattr(cfg, key)
        if any(value not in allowed for value in (values if isinstance(values, list) else [values])):
            raise SystemExit(f"[config] {key}={values!r}: choose {'from' if isinstance(values, list) else 'one of'} {allowed}")
    configurator.check_ranges(cfg, RANGES)
    if cfg.prompts_per_step % world_size:
        raise SystemExit(f"[config] prompts_per_step={cfg.prompts_per_step} must divide by the {world_size} ranks")
    unknown_views = set(cfg.eval_views) - set(evaluate.VIEWS)
    if len(set(cfg.eval_views)) < len(cfg.eval_views):  # each would be scored again, minutes on a CPU
        raise SystemExit(f"[config] eval_views={cfg.eval_views} names a view twice")
    if unknown_views or "original" not in cfg.eval_views:
        raise SystemExit(f"[config] eval_views={cfg.eval_views}: choose from {evaluate.VIEWS}, original among them "
                         "(eval.json's headline scores are its)")
    if not cfg.output_dir:
        raise SystemExit("[config] output_dir is empty: name the run's folder")
    if not (cfg.adam_beta1 < 1 and cfg.adam_beta2 < 1):  # RANGES' upper bounds are inclusive
        raise SystemExit(f"[config] adam_beta1={cfg.adam_beta1}, adam_beta2={cfg.adam_beta2}: each must be < 1")
    if len(cfg.reward_funcs) != len(cfg.reward_weights):
        raise SystemExit(f"[config] reward_funcs {cfg.reward_funcs} and reward_weights {cfg.reward_weights} "
                         "must have the same length")
    if not cfg.eval_only:
        check_training(cfg)


def check_training(cfg):
    """What only a training run needs (--eval_only ignores a recipe's training keys)."""
    if not any(cfg.reward_weights) and not cfg.gail_use:
        raise SystemExit(f"[config] reward_funcs {cfg.reward_funcs} with weights {cfg.reward_weights} and GAIL off: "
                         "every reward would be 0")
    if cfg.beta and cfg.bc_steps:
        raise SystemExit("[config] beta > 0 with bc_steps: the KL's reference would be the model before cloning; "
                         "clone in a run of its own and start GRPO from its checkpoint (run.sh ablation does)")
    if cfg.bc_steps > 0 and cfg.prompt_mode != "answer":
        raise SystemExit("[config] bc_steps needs prompt_mode=answer: the human answer is the whole completion there")
    if "calibration" in cfg.reward_funcs:
        if cfg.num_generations < 3:
            raise SystemExit("[config] the calibration reward compares each sample with the others of its group: "
                             "num_generations must be >= 3")
        if cfg.scale_rewards == "group":
            raise SystemExit("[config] the calibration reward is proper only with scale_rewards=batch or none: a per-group "
                             "std reweights groups by what they sampled and pulls the policy toward the mode "
                             "(rewards.calibration_rewards)")


# ---------------------------------------------------------------------------------------------
# Set-up and the loop


def train(cfg, world, ignored_keys=()):
    """Train (or with `eval_only`, evaluate) as `cfg` says. Returns the final evaluation's metrics;
    raises distributed.Preempted after checkpointing when a stop is requested."""
    if cfg.split_seed < 0:
        cfg.split_seed = cfg.seed  # resolved before the config is compared or written: the folder records the split
    # What can fail without writing comes first: a mistake here must not leave a run folder behind.
    outputs.check_reporters(cfg.report_to if world.is_main else [])
    train_rows, val_rows = data.load_examples(cfg.dataset, cfg.val_fraction, cfg.split_seed, world.print)
    evaluates = bool(cfg.eval_only or cfg.eval_on_start or cfg.eval_on_end or cfg.eval_steps)
    eval_rows = evaluate.select_rows(train_rows, val_rows, cfg.eval_split, cfg.eval_max_rows, cfg.split_seed,
                                     evaluates)
    if not train_rows and not cfg.eval_only:
        raise data.DataError("no training rows: the source holds only a held-out split (files named test, "
                             "validation, ... are one) or every participant is in the validation split; "
                             "name the training file train.jsonl, or score a model with --eval_only")
    run = outputs.RunFolder(cfg.output_dir)
    distributed.on_main(world, lambda: run.lock(cfg.lock_wait_seconds))  # before anything is written
    run.check_writable()
    changed = run.check_reuse(dataclasses.asdict(cfg), cfg.resume, RESUMABLE_KEYS)
    tracker = outputs.Tracker(cfg.report_to if world.is_main else [], run, dataclasses.asdict(cfg))
    torch.manual_seed(cfg.seed + world.rank)  # per-rank seed: ranks sample different completions
    if ignored_keys:
        world.print(f"[config] ignored recipe keys with no meaning here: {', '.join(sorted(ignored_keys))}")
    if changed:
        world.print(f"[config] changed since the run began: {'; '.join(changed)}")
    if not cfg.eval_only and rewards.tilts_calibration(cfg.reward_funcs, cfg.scale_rewards, cfg.prompts_per_step):
        world.print(f"[config] scale_rewards=batch at {cfg.prompts_per_step} prompts a step tilts the calibration "
                    "reward toward the mode (about 1/prompts; rewards.calibration_rewards): none is exact")
    prompt = prompts.PromptFormat.of(cfg)

    def fitting(rows, name, model, tokenizer):  # rows past the model's positions are skipped and counted
        return prompts.fitting_rows(rows, tokenizer, prompt, model.config, cfg.max_completion_length, name, world.print)

    # The untrained model's scores stand beside every later evaluation (kept from step 0's).
    resumed_eval = run.eval_at(0).exists() and not cfg.eval_only
    untrained = evaluate.untrained_scores(outputs.read_json(run.eval_at(0))) if resumed_eval else None

    def evaluate_and_save(model, tokenizer, step, files=None):  # files: the folder the model is still equal to
        nonlocal untrained
        precision = (f"autocast {distributed.uses_autocast(world.device, cfg.bf16, cfg.cpu_bf16)}, "
                     f"fp32 head {cfg.cast_lm_head_to_fp32}")
        cache = evaluate.DistributionCache(files, model, precision, checkpoint.cache_root() / "evals", world) \
            if files and cfg.eval_cache and prompt.answer_only else None
        world.print(f"[eval step {step}] {len(eval_rows)} {cfg.eval_split} rows x {len(cfg.eval_views)} views "
                    f"({', '.join(cfg.eval_views)}), {'exact' if prompt.answer_only else 'sampled'} choice and opinion distributions")
        t0 = time.time()
        metrics, predictions = evaluate.evaluate(model, tokenizer, eval_rows, train_rows, prompt, cfg, world,
                                                 lambda: distributed.stop_requested(world, cfg.grail_stop_file), cache)
        metrics.update(step=step, seconds=round(time.time() - t0, 1), model=cfg.eval_only or cfg.model_name_or_path,
                       dataset=cfg.dataset or "bundled data/", split=cfg.eval_split)
        if step == 0 and not cfg.eval_only:
            untrained = evaluate.untrained_scores(metrics)
        elif untrained:
            evaluate.set_beside(metrics, untrained, world.print)
        if world.is_main:
            run.write_eval(metrics, predictions, alone=bool(cfg.eval_only))
            tracker.log({f"eval/{k}": v for k, v in metrics.items() if k.startswith(("choice_", "opinion_"))}, step)
            print(f"[eval step {step}, {len(eval_rows)} {cfg.eval_split} rows, {metrics['seconds']}s]\n"
                  f"{reports.eval_summary(metrics)}", flush=True)
        return metrics

    if cfg.eval_only:
        path = checkpoint.resolve_model(cfg.eval_only, world)
        model, tokenizer = checkpoint.load_model(path, world.device, trainable=False,
                                                  fp32_head=cfg.cast_lm_head_to_fp32), checkpoint.load_tokenizer(path)
        eval_rows = fitting(eval_rows, cfg.eval_split, model, tokenizer)
        environment = checkpoint.environment(world)  # every rank: it all-gathers the device names
        try:
            step = checkpoint.trainer_state(path).get("step", 0)  # the checkpoint's; 0 for another model
            metrics = evaluate_and_save(model, tokenizer, step, path)
        except evaluate.Stopped:
            raise distributed.preempted(0, "[stop] evaluation stopped on request: nothing written",
                                        cfg.grail_stop_file, world) from None
        if world.is_main:
            run.write_config(dataclasses.asdict(cfg), environment, None)
        return metrics

    model_path = checkpoint.resolve_model(cfg.model_name_or_path, world)
    resume_from = checkpoint.newest_complete(run.checkpoints(), world.print) if cfg.resume else None
    policy_path = str(resume_from) if resume_from else model_path
    tokenizer = checkpoint.load_tokenizer(policy_path)
    # Generation and checkpoints use the bare model; the update goes through `policy`.
    model = checkpoint.load_model(policy_path, world.device, trainable=True, checkpointing=cfg.gradient_checkpointing,
                                  fp32_head=cfg.cast_lm_head_to_fp32)
    ref_model = checkpoint.load_model(model_path, world.device, trainable=False,
                                      fp32_head=cfg.cast_lm_head_to_fp32) if cfg.beta else None
    train_rows = fitting(train_rows, "train", model, tokenizer)
    if evaluates:  # a run that evaluates nothing neither reads nor refuses the held-out prompts
        eval_rows = fitting(eval_rows, cfg.eval_split, model, tokenizer)
    if cfg.max_steps <= 0:
        cfg.max_steps = math.ceil(cfg.num_train_epochs * len(train_rows) / cfg.prompts_per_step)
    disc_trainer = None
    if cfg.gail_use:
        discriminator = disc.build(cfg.gail_disc_model, model, tokenizer, world.device, cfg.seed)
        disc_trainer = disc.DiscriminatorTrainer(discriminator, train_rows, cfg, world.rank, val_rows)
    policy = distributed.wrap(grpo.Policy(model, cfg.shared_prefix), model, cfg.fsdp, world)
    optimizer, scheduler = grpo.make_optimizer(model, cfg)
    start_step = checkpoint.restore(resume_from, model, optimizer, scheduler, disc_trainer, world) \
        if resume_from else 0
    if start_step > cfg.max_steps:
        raise SystemExit(f"[config] max_steps={cfg.max_steps} is behind {resume_from}: raise max_steps, or train "
                         "into another output_dir")

    environment = checkpoint.environment(world)  # every rank: it all-gathers the device names
    if world.is_main:
        run.write_config(dataclasses.asdict(cfg), environment, resume_from)
        run.forget_steps_after(start_step)  # a run that died between checkpoints logged steps it will redo
    world.print(f"[train] {len(train_rows)} train rows, {len(eval_rows)} eval rows, world size {world.size}, "
                f"steps {start_step}->{cfg.max_steps}" + (f", resumed from {resume_from}" if resume_from else ""))

    try:
        if start_step == 0:
            if cfg.eval_on_start:
                evaluate_and_save(model, tokenizer, 0, model_path)
            if cfg.bc_steps:
                behaviour_cloning(policy, model, tokenizer, train_rows, cfg, world, run)
            # D learns the starting policy before its reward joins (no bar without GAIL).
            for k in tqdm(range(cfg.gail_warmup_steps if disc_trainer else 0), desc="gail warm-up",
                          disable=not (world.is_main and disc_trainer)):
                if distributed.stop_requested(world, cfg.grail_stop_file):
                    raise evaluate.Stopped
                collect_rollouts(model, tokenizer, train_rows, k, cfg, world, disc_trainer, f"{cfg.seed}:gail")
                for _ in range(cfg.gail_disc_steps):
                    disc_trainer.step()
    except evaluate.Stopped:
        raise distributed.preempted(0, "[stop] requested before the first step: nothing to checkpoint, a restart "
                                       "begins again", cfg.grail_stop_file, world) from None
    progress = range(start_step, cfg.max_steps)
    if world.is_main:
        progress = tqdm(progress, initial=start_step, total=cfg.max_steps, desc="grpo", dynamic_ncols=True)
    for step in progress:
        t0 = time.time()
        batch, record, samples = collect_rollouts(model, tokenizer, train_rows, step, cfg, world, disc_trainer)
        add_logprobs(model, ref_model, batch, cfg, world)
        lr = optimizer.param_groups[0]["lr"]  # this step's rate, as the update uses it
        model.train()
        record.update = grpo.update(policy, optimizer, scheduler, batch, cfg, world)
        # After scoring: this step's reward came from the discriminator as it was before this update.
        disc_updates = [disc_trainer.step() for _ in range(cfg.gail_disc_steps)] if disc_trainer else []
        seconds = time.time() - t0
        gathered = distributed.all_gather_list([(record, disc_updates)])
        metrics = grpo.step_metrics(step + 1, [r for r, _ in gathered], cfg.num_generations, lr, seconds)
        if disc_trainer is not None:
            metrics.update(disc.step_metrics([r.disc for r, _ in gathered], [u for _, ups in gathered for u in ups]))
        if world.is_main:
            with_samples = step == start_step or (cfg.log_completions_steps and
                                                  (step + 1) % cfg.log_completions_steps == 0)
            run.append_step(metrics, samples if with_samples else ())
            tracker.log(metrics, step + 1)
            progress.set_postfix(reward=f"{metrics['reward/total/mean']:.3f}",
                                 acc=f"{metrics['reward/accuracy/mean']:.3f}",
                                 zero_std=f"{metrics['frac_reward_zero_std']:.2f}", s=f"{seconds:.1f}")
        done = step + 1 == cfg.max_steps
        saved = done or (cfg.save_steps and (step + 1) % cfg.save_steps == 0)
        if saved:
            checkpoint.save(model, tokenizer, optimizer, scheduler, disc_trainer, step + 1, cfg, world)
        stop = not done and distributed.stop_requested(world, cfg.grail_stop_file)  # the same answer on every rank
        if not stop and not done and cfg.eval_steps and (step + 1) % cfg.eval_steps == 0:
            try:
                evaluate_and_save(model, tokenizer, step=step + 1)
            except evaluate.Stopped:
                stop = True
        if stop:
            if not saved:
                checkpoint.save(model, tokenizer, optimizer, scheduler, disc_trainer, step + 1, cfg, world)
            raise distributed.preempted(step + 1, f"[stop] requested: checkpoint-{step + 1:06d} written; a restart "
                                                  "resumes from it", cfg.grail_stop_file, world)
    final = None
    # Resumed after the last step (stopped during the final evaluation, say): rank 0's eval.json decides.
    evaluated = start_step == cfg.max_steps and distributed.all_gather_list(
        [outputs.read_json(run.eval)["step"] if run.eval.exists() else None])[0] == cfg.max_steps
    if cfg.eval_on_end and not evaluated:
        try:
            final = evaluate_and_save(model, tokenizer, step=cfg.max_steps)
        except evaluate.Stopped:  # the last checkpoint is written: a restart only evaluates
            raise distributed.preempted(cfg.max_steps, "[stop] requested during the final evaluation: a restart runs "
                                                       "it again", cfg.grail_stop_file, world) from None
    tracker.close()
    world.print(f"[done] outputs in {run.path}/ (the files: outputs.py)")
    return final


def collect_rollouts(model, tokenizer, train_rows, step, cfg, world, disc_trainer=None, prompt_seed=None):
    """This rank's prompts of `step` (drawn with `prompt_seed`, default the run's seed), their G samples,
    rewards (with the discriminator's when `disc_trainer`) and advantages. Returns (batch,
    StepRecord without the update's statistics, samples)."""
    indices = data.rank_step_prompts(len(train_rows), cfg.prompts_per_step, step, prompt_seed or cfg.seed, world)
    rows = [data.training_row(train_rows[i], i, step, cfg.seed, cfg.shuffle_slates) for i in indices]
    G, prompt = cfg.num_generations, prompts.PromptFormat.of(cfg)
    model.eval()
    # Samples come from the same bf16 model the log-probs see.
    with distributed.full_params(model), distributed.autocast(world.device, cfg.bf16, cfg.cpu_bf16):
        out = rollout.generate(model, tokenizer, [prompt.text(tokenizer, row) for row in rows], G,
                               cfg.max_completion_length, cfg.temperature, cfg.top_p, shared_prefix=cfg.shared_prefix)
    expanded = [row for row in rows for _ in range(G)]
    truncated = out.truncated.tolist()
    parsed = [rewards.parse(text, was_truncated, row, prompt.answer_only)
              for text, was_truncated, row in zip(out.texts, truncated, expanded)]
    total, components, counts = rewards.score(parsed, expanded, cfg.reward_funcs,
                                              cfg.reward_weights, G)
    diagnostics = None
    if disc_trainer is not None:
        picked = [p.choice for p in parsed]
        components["disc"], diagnostics = disc_trainer.policy_rewards(rows, indices, picked, G)
        counts["disc_no_choice"] = sum(c is None for c in picked)
        total = rewards.mix_disc(total, components["disc"], cfg.gail_weight)
    rewards_bg = torch.tensor(total, dtype=torch.float32, device=world.device).view(-1, G)
    advantages = grpo.group_advantages(rewards_bg, cfg.scale_rewards, cfg.std_floor).view(-1)
    batch = {"prompt_ids": out.prompt_ids, "prompt_mask": out.prompt_mask, "completion_ids": out.completion_ids,
             "completion_mask": out.completion_mask, "advantages": advantages}
    record = grpo.StepRecord(rewards=total, components=components, counts=dict(counts),
                             advantages=advantages.tolist(), lengths=out.completion_mask.sum(dim=1).tolist(),
                             truncated=truncated, prompt_tokens=int(out.prompt_mask.sum()),
                             completion_tokens=int(out.completion_mask.sum()), disc=diagnostics)
    samples = [{"step": step + 1, "row_id": row.get("id"), "gold": row["gold_index"], "completion": text,
                "reward": r} for row, text, r in zip(expanded, out.texts, total)][:G]
    return batch, record, samples


def add_logprobs(model, ref_model, batch, cfg, world):
    """The update's no-grad log-prob passes: the sampling policy's (before this step's updates) when
    it takes several, the reference's for the KL. Not for the GAIL warm-up's samples, which only D reads."""
    if cfg.num_iterations > 1:
        with distributed.full_params(model):
            batch["old_logp"] = grpo.no_grad_logprobs(model, batch, cfg, world)
    if ref_model is not None:
        batch["ref_logp"] = grpo.no_grad_logprobs(ref_model, batch, cfg, world)


def behaviour_cloning(policy, model, tokenizer, train_rows, cfg, world, run):
    """The warm start (grpo.behaviour_cloning) on the training split's human answers, `prompts_per_step`
    rows a step, its curve into the run folder; a stop request ends it (it is not checkpointed: a restart
    begins it again)."""
    prompt, prior = prompts.PromptFormat.of(cfg), choices.position_prior(train_rows)
    opinion_prior, end = OPINION_BASELINES[cfg.bc_opinion_prior](train_rows), rollout.stop_token_ids(model, tokenizer)[0]

    def batches():
        for step in tqdm(range(cfg.bc_steps), desc="cloning", disable=not world.is_main, dynamic_ncols=True):
            if distributed.stop_requested(world, cfg.grail_stop_file):
                raise distributed.preempted(0, f"[stop] requested during behaviour cloning (step {step}): a restart "
                                               "begins again", cfg.grail_stop_file, world)
            rows = [train_rows[i] for i in data.rank_step_prompts(len(train_rows), cfg.prompts_per_step, step,
                                                                   f"{cfg.seed}:bc", world)]
            yield [prompt.text(tokenizer, r) for r in rows], [
                choices.cloning_targets(tokenizer, r, prior, cfg.bc_label_smoothing, opinion_prior,
                                        cfg.bc_opinion_smoothing, end) for r in rows]

    steps = grpo.behaviour_cloning(policy, model, tokenizer, batches(), cfg, world)
    if world.is_main:
        run.write_cloning(steps)
    losses = [s["loss"] for s in steps]
    world.print(f"[bc] {cfg.bc_steps} steps of behaviour cloning on the human answers: cross-entropy per row "
                f"{statistics.fmean(losses[:5]):.3f} (first 5) -> {statistics.fmean(losses[-5:]):.3f} (last 5)")


def main():
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-tensor load bars drown the training log
    cfg, ignored = parse_config(sys.argv[1:], os.environ)
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # preemption: finish the step, checkpoint, exit
        signal.signal(sig, lambda *_: distributed.STOP_REQUESTED.set())
    world = distributed.setup(cfg.dist_timeout_minutes)
    finished = False
    try:
        train(cfg, world, ignored)
        finished = True
    except distributed.Preempted:  # every rank stops at the same point
        finished = True
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    finally:
        distributed.shutdown(wait_for_peers=finished)


if __name__ == "__main__":
    errors.run(main)
