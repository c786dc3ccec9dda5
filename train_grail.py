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
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import checkpoint
import configurator
import data
import disc
import distributed
import evaluate
import grpo
import prompts
import reports
import rewards
import rollout
from outputs import RunFolder, read_json


@dataclass
class Config:
    # --- model and data ---
    model_name_or_path: str = checkpoint.EMBEDDED_MODEL  # HF causal-LM id or folder (default: SmolLM2-135M, offline)
    dataset: str = ""             # hub id, save_to_disk folder, .jsonl/.json/.parquet files (comma-separated); '' = data/
    output_dir: str = "out/grail"  # the run folder (outputs.py): metrics, evaluations, completions, checkpoints
    prompt_mode: str = "think"    # think: upstream <think><answer><opinion> prompt | answer: the turn opens with <answer>
    system_prompt: str = ""       # '' = the default prompt of prompt_mode
    grail_max_history: int = 12   # most recent history entries in the prompt (0 = all); env GRAIL_MAX_HISTORY
    val_fraction: float = 0.1     # participants held out (per issue and study) when the dataset has no validation split
    shuffle_slates: bool = True   # permute each training slate (gold remapped): position carries no reward
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
    reward_weights: list = field(default_factory=lambda: [1.0, 0.2])  # one weight per reward function
    # --- GAIL discriminator (disc.py); every gail_* key is also read from its GAIL_* env var ---
    gail_use: bool = False        # mix the discriminator's reward into the GRPO reward (0 = pure GRPO, the baseline)
    gail_weight: float = 0.5      # base and disc rewards weighted (1, gail_weight), normalised to sum 1 (upstream)
    gail_alpha: float = 1.0       # r_disc = alpha * f(D)
    gail_reward: str = "prob"     # f: prob D (upstream) | logit: log D - log(1-D) | neglog: -log(1-D)
    gail_reward_clip: float = 5.0  # |r_disc| bound
    gail_disc_model: str = ""     # '' = built-in (policy embeddings + 2-layer encoder, width 128) | HF encoder id/folder
    gail_lr: float = 1e-4         # discriminator AdamW learning rate (upstream used 2e-5 for distilbert)
    gail_negatives: str = "all"   # all: every policy sample is a negative (GAIL) | wrong: only choices != gold (upstream)
    gail_disc_steps: int = 1      # discriminator updates per policy step
    gail_disc_batch: int = 32     # pairs per update
    gail_human_fraction: float = 0.5  # share of human pairs in an update, the rest from the replay buffer
    gail_buffer_size: int = 2048  # recent policy pairs kept per rank
    gail_warmup_steps: int = 2    # policy steps whose reward leaves the discriminator out (it trains already)
    gail_gradient_penalty: float = 0.0  # R1 weight on human states' input embeddings
    gail_label_smoothing: float = 0.0  # targets 1-eps for humans, eps for the policy
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
    # --- evaluation, logging, checkpoints ---
    eval_steps: int = 50          # also evaluated before the first and after the last step; 0 = only those
    eval_max_rows: int = 0        # 0 = the whole split: a seeded sample of this many rows otherwise
    eval_split: str = "validation"  # validation | train | all: the rows evaluated
    eval_views: list = field(default_factory=lambda: list(evaluate.VIEWS))  # original, shuffled, cue_neutral
    eval_samples: int = 8         # K sampled answers per row (temperature 1) for simulation quality; 0 = off
    eval_batch_size: int = 16     # prompts per evaluation generation batch (each with its samples)
    eval_only: str = ""           # a checkpoint folder or hub id: evaluate it and exit
    log_completions_steps: int = 10  # write sample completions every N steps
    save_steps: int = 50          # checkpoint every N steps and at the end
    save_total_limit: int = 3     # checkpoints kept in output_dir
    resume: bool = True           # continue from the newest complete checkpoint in output_dir
    seed: int = 42                # data order, slate shuffles, split, and (plus the rank) sampling
    dist_timeout_minutes: int = 60  # process-group timeout: long generations on one rank can be slow
    grail_stop_file: str = ""     # env GRAIL_STOP_FILE: when this file appears, checkpoint and exit 99 (run.sh under SLURM)


PREEMPTED_EXIT_CODE = 99  # "checkpointed on request, requeue me"; run.sh requeues the SLURM job on it
STOP_REQUESTED = threading.Event()  # set by SIGTERM / SIGUSR1 (see main)


def parse_config(argv, environ):
    """The effective Config and the ignored recipe keys."""
    cfg, ignored = configurator.apply_overrides(Config, argv, environ)
    try:
        cfg.reward_funcs = rewards.canonical_reward_names(cfg.reward_funcs)
        cfg.reward_weights = [float(w) for w in cfg.reward_weights]
    except ValueError as err:
        raise SystemExit(f"bad config value: {err}") from None
    check_config(cfg)
    return cfg, ignored


def check_config(cfg):
    choices = {"prompt_mode": ("think", "answer"), "loss_type": ("grpo", "dr_grpo", "dapo"),
               "scale_rewards": ("group", "batch", "none"), "eval_split": ("validation", "train", "all"),
               "gail_reward": tuple(disc.REWARD_FORMS), "gail_negatives": ("all", "wrong")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"{key}={getattr(cfg, key)!r}: choose one of {allowed}")
    unknown_views = set(cfg.eval_views) - set(evaluate.VIEWS)
    if unknown_views or not cfg.eval_views:
        raise SystemExit(f"eval_views={cfg.eval_views}: choose from {evaluate.VIEWS}")
    if len(cfg.reward_funcs) != len(cfg.reward_weights):
        raise SystemExit(f"reward_funcs {cfg.reward_funcs} and reward_weights {cfg.reward_weights} "
                         "must have the same length")
    if cfg.num_generations < 2 and not cfg.eval_only:
        raise SystemExit("num_generations must be >= 2: advantages are relative to the group")
    if "calibration" in cfg.reward_funcs and not cfg.eval_only:
        if cfg.num_generations < 3:
            raise SystemExit("the calibration reward compares each sample with the others of its group: "
                             "num_generations must be >= 3")
        if cfg.scale_rewards == "group":
            raise SystemExit("the calibration reward is proper only with scale_rewards=batch or none: a per-group "
                             "std reweights groups by what they sampled and pulls the policy toward the mode "
                             "(rewards.calibration_rewards)")


def prompt_format(cfg):
    return prompts.PromptFormat(cfg.prompt_mode, cfg.system_prompt, cfg.grail_max_history)


class Preempted(Exception):
    """A stop was requested (signal or stop file); the checkpoint of step `args[0]` is written."""


# ---------------------------------------------------------------------------------------------
# Set-up and the loop


def train(cfg, world, ignored_keys=()):
    """Train (or with `eval_only`, evaluate) as `cfg` says. Returns the final evaluation's metrics;
    raises Preempted after checkpointing when a stop is requested."""
    run = RunFolder(cfg.output_dir)
    torch.manual_seed(cfg.seed + world.rank)  # per-rank seed: ranks sample different completions
    if ignored_keys:
        world.print(f"[config] ignored recipe keys with no meaning here: {', '.join(sorted(ignored_keys))}")
    train_rows, val_rows = data.load_examples(cfg.dataset, cfg.val_fraction, cfg.seed, world.print)
    if cfg.max_steps <= 0:
        cfg.max_steps = math.ceil(cfg.num_train_epochs * len(train_rows) / cfg.prompts_per_step)
    eval_rows = {"validation": val_rows, "train": train_rows, "all": train_rows + val_rows}[cfg.eval_split]
    if cfg.eval_max_rows and cfg.eval_max_rows < len(eval_rows):  # a seeded sample keeps every study in
        keep = sorted(random.Random(f"{cfg.seed}:eval").sample(range(len(eval_rows)), cfg.eval_max_rows))
        eval_rows = [eval_rows[i] for i in keep]
    prompt = prompt_format(cfg)
    # The untrained model's scores stand beside every later evaluation (kept from step 0's).
    untrained = None
    if run.eval_at(0).exists() and not cfg.eval_only:  # a resumed run
        untrained = evaluate.untrained_scores(read_json(run.eval_at(0)))

    def evaluate_and_save(model, tokenizer, step):
        nonlocal untrained
        t0 = time.time()
        metrics, predictions = evaluate.evaluate(model, tokenizer, eval_rows, train_rows, prompt, cfg, world)
        metrics.update(step=step, seconds=round(time.time() - t0, 1), model=cfg.eval_only or cfg.model_name_or_path,
                       dataset=cfg.dataset or "bundled data/", split=cfg.eval_split)
        if step == 0 and not cfg.eval_only:
            untrained = evaluate.untrained_scores(metrics)
        elif untrained:
            metrics["untrained"] = untrained
        if world.is_main:
            run.write_eval(metrics, predictions)
            print(f"[eval step {step}, {len(eval_rows)} {cfg.eval_split} rows, {metrics['seconds']}s]\n"
                  f"{reports.eval_summary(metrics)}", flush=True)
        return metrics

    if cfg.eval_only:
        path = checkpoint.resolve_model(cfg.eval_only, world)
        model, tokenizer = checkpoint.load_model(path, world.device, trainable=False), checkpoint.load_tokenizer(path)
        return evaluate_and_save(model, tokenizer, step=0)

    model_path = checkpoint.resolve_model(cfg.model_name_or_path, world)
    resume_from = run.checkpoints()[-1] if cfg.resume and run.checkpoints() else None
    policy_path = str(resume_from) if resume_from else model_path
    tokenizer = checkpoint.load_tokenizer(policy_path)
    # Generation and checkpoints use the bare model; the update goes through `policy`.
    model = checkpoint.load_model(policy_path, world.device, trainable=True, checkpointing=cfg.gradient_checkpointing)
    ref_model = checkpoint.load_model(model_path, world.device, trainable=False) if cfg.beta else None
    disc_trainer = None
    if cfg.gail_use:
        discriminator = disc.build(cfg.gail_disc_model, model, tokenizer, world.device, cfg.seed)
        disc_trainer = disc.DiscriminatorTrainer(discriminator, train_rows, cfg, world.rank)
    policy = distributed.wrap(grpo.Policy(model, cfg.shared_prefix), model, cfg.fsdp, world)
    optimizer, scheduler = grpo.make_optimizer(model, cfg)
    start_step = checkpoint.restore(resume_from, model, optimizer, scheduler, disc_trainer, world) \
        if resume_from else 0

    environment = checkpoint.environment(world)  # every rank: it all-gathers the device names
    if world.is_main:
        run.write_config(dataclasses.asdict(cfg), environment, resume_from)
    world.print(f"[train] {len(train_rows)} train rows, {len(eval_rows)} eval rows, world size {world.size}, "
                f"steps {start_step}->{cfg.max_steps}" + (f", resumed from {resume_from}" if resume_from else ""))

    if start_step == 0:
        evaluate_and_save(model, tokenizer, step=0)
    progress = range(start_step, cfg.max_steps)
    if world.is_main:
        from tqdm import tqdm

        progress = tqdm(progress, initial=start_step, total=cfg.max_steps, desc="grpo", dynamic_ncols=True)
    for step in progress:
        t0 = time.time()
        batch, record, samples = collect_rollouts(model, ref_model, tokenizer, train_rows, step, cfg, world,
                                                  disc_trainer)
        lr = scheduler.get_last_lr()[0]
        model.train()
        record.update = grpo.update(policy, optimizer, scheduler, batch, cfg, world)
        # After scoring: this step's reward came from the discriminator as it was before this update.
        disc_updates = [disc_trainer.step() for _ in range(cfg.gail_disc_steps)] if disc_trainer else []
        seconds = time.time() - t0
        gathered = distributed.all_gather_list([(record, disc_updates)])
        metrics = grpo.step_metrics(step + 1, [r for r, _ in gathered], cfg.num_generations, lr, seconds)
        if disc_trainer is not None:
            metrics.update(disc.step_metrics([d for r, _ in gathered for d in r.d_policy],
                                             [u for _, updates in gathered for u in updates]))
        if world.is_main:
            with_samples = step == start_step or (cfg.log_completions_steps and
                                                  (step + 1) % cfg.log_completions_steps == 0)
            run.append_step(metrics, samples if with_samples else ())
            progress.set_postfix(reward=f"{metrics['reward/total/mean']:.3f}",
                                 acc=f"{metrics['reward/accuracy/mean']:.3f}",
                                 zero_std=f"{metrics['frac_reward_zero_std']:.2f}", s=f"{seconds:.1f}")
        done = step + 1 == cfg.max_steps
        saved = cfg.save_steps and ((step + 1) % cfg.save_steps == 0 or done)
        if saved:
            checkpoint.save(model, tokenizer, optimizer, scheduler, disc_trainer, step + 1, cfg, world)
        if not done and stop_requested(cfg, world):  # every rank agrees, so all stop after the same step
            if not saved:
                checkpoint.save(model, tokenizer, optimizer, scheduler, disc_trainer, step + 1, cfg, world)
            world.print(f"[stop] requested: checkpoint-{step + 1:06d} written; a restart resumes from it")
            if world.is_main and cfg.grail_stop_file:  # consumed: the resumed run must not stop again
                Path(cfg.grail_stop_file).unlink(missing_ok=True)
            raise Preempted(step + 1)
        if cfg.eval_steps and (step + 1) % cfg.eval_steps == 0 and not done:
            evaluate_and_save(model, tokenizer, step=step + 1)
    final = None
    if start_step < cfg.max_steps or not run.eval.exists():
        final = evaluate_and_save(model, tokenizer, step=cfg.max_steps)
    world.print(f"[done] outputs in {run.path}/: metrics.jsonl, completions.jsonl, eval.json, evals/, checkpoint-*/")
    return final


def collect_rollouts(model, ref_model, tokenizer, train_rows, step, cfg, world, disc_trainer=None):
    """This rank's prompts of `step`, their G samples, rewards (with the discriminator's when
    `disc_trainer`) and advantages, and the no-grad log-prob passes (old policy, reference).
    Returns (batch, StepRecord without the update's statistics, sample completions)."""
    indices = data.rank_share(data.step_prompts(len(train_rows), cfg.prompts_per_step, step, cfg.seed),
                              world.rank, world.size)
    rows = [data.training_row(train_rows[i], i, step, cfg.seed, cfg.shuffle_slates) for i in indices]
    G, prompt = cfg.num_generations, prompt_format(cfg)
    model.eval()
    # Samples come from the same bf16 model the log-probs see.
    with distributed.full_params(model), distributed.autocast(cfg.bf16, world.device):
        out = rollout.generate(model, tokenizer, [prompt.text(tokenizer, row) for row in rows], G,
                               cfg.max_completion_length, cfg.temperature, cfg.top_p, shared_prefix=cfg.shared_prefix)
    expanded = [row for row in rows for _ in range(G)]
    truncated = out.truncated.tolist()
    parsed = [rewards.parse(text, was_truncated, row, prompt.answer_only)
              for text, was_truncated, row in zip(out.texts, truncated, expanded)]
    total, components, counts = rewards.score(parsed, expanded, prompt.answer_only, cfg.reward_funcs,
                                              cfg.reward_weights, G)
    d_policy = []
    if disc_trainer is not None:
        choices = [p.choice for p in parsed]
        components["disc"], d_policy = disc_trainer.policy_rewards(rows, indices, choices, G)
        counts["disc_no_choice"] = sum(c is None for c in choices)
        if step >= cfg.gail_warmup_steps:
            total = rewards.mix_disc(total, components["disc"], cfg.gail_weight)
    rewards_bg = torch.tensor(total, dtype=torch.float32, device=world.device).view(-1, G)
    advantages = grpo.group_advantages(rewards_bg, cfg.scale_rewards, cfg.std_floor).view(-1)
    batch = {"prompt_ids": out.prompt_ids, "prompt_mask": out.prompt_mask, "completion_ids": out.completion_ids,
             "completion_mask": out.completion_mask, "advantages": advantages}
    if cfg.num_iterations > 1:  # the sampling policy, before this step's updates
        with distributed.full_params(model):
            batch["old_logp"] = grpo.no_grad_logprobs(model, batch, cfg, world)
    if ref_model is not None:
        batch["ref_logp"] = grpo.no_grad_logprobs(ref_model, batch, cfg, world)
    record = grpo.StepRecord(rewards=total, components=components, counts=dict(counts),
                             advantages=advantages.tolist(), lengths=out.completion_mask.sum(dim=1).tolist(),
                             truncated=truncated, prompt_tokens=int(out.prompt_mask.sum()),
                             completion_tokens=int(out.completion_mask.sum()), d_policy=d_policy)
    samples = [{"step": step + 1, "row_id": row.get("id"), "gold": row["gold_index"], "completion": text,
                "reward": r} for row, text, r in zip(expanded, out.texts, total)][:G]
    return batch, record, samples


def stop_requested(cfg, world):
    """Has any rank been asked to stop (a signal, or the stop file)? One all-reduce per step."""
    local = STOP_REQUESTED.is_set() or bool(cfg.grail_stop_file and Path(cfg.grail_stop_file).exists())
    return distributed.all_reduce_sum(torch.tensor(float(local), device=world.device)).item() > 0


def main():
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-tensor load bars drown the training log
    cfg, ignored = parse_config(sys.argv[1:], os.environ)
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # preemption: finish the step, checkpoint, exit
        signal.signal(sig, lambda *_: STOP_REQUESTED.set())
    world = distributed.setup(cfg.dist_timeout_minutes)
    finished = False
    try:
        train(cfg, world, ignored)
        finished = True
    except Preempted:  # every rank stops after the same step
        finished = True
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    except (data.DataError, FileNotFoundError) as err:  # a bad dataset is a message, not a traceback
        raise SystemExit(f"[data] {err}") from None
    finally:
        distributed.shutdown(wait_for_peers=finished)


if __name__ == "__main__":
    main()
