"""Benchmark the shared-prefix paths against the naive ones on the default model (a script, not a test).

    python -m bench.steps [--runs=5] [--prompts=2] [--generations=4] [--new_tokens=32] [--prompt_mode=think]
                          [--model=PATH_OR_ID] [--threads=N]        # from the repository root

Real bundled gun-control prompts. Each phase runs in its own process (so each has its own peak RSS),
one warm-up, then `runs` timed repetitions; the table shows medians and the ratio to the baseline
measured in the same invocation:
  (a) plain `generate` (each prompt prefilled G times) vs shared-prefix generation
  (b) naive forward+backward (G full prompt+completion rows per prompt) vs shared-prefix
  (c) one full GRPO step (rollout, rewards, update) with the shared prefix: beta 0, then in the
      low-memory setting (activation checkpointing, one prompt per micro-batch) at beta 0, beta 0.04
      and with the discriminator
  (d) peak RSS of each phase, and training tokens processed vs unique
  (e) scoring B=8 x G completions with the discriminator: disc.py's logit table vs upstream's way
      (render one text per completion, one pass each of an encoder of the same width and depth)
"""
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import checkpoint
import data
import disc
import distributed
import errors
import grpo
import prompts
import rollout
import train_grail as tg

ROOT = Path(__file__).resolve().parent.parent
PHASES = {  # name: (label, baseline phase for the ratio)
    "generate_plain": ("(a) generate, plain (prompt prefilled G times)", None),
    "generate_shared": ("(a) generate, shared prefix", "generate_plain"),
    "train_naive": ("(b) forward+backward, naive", None),
    "train_shared": ("(b) forward+backward, shared prefix", "train_naive"),
    "train_shared_ckpt": ("(b) forward+backward, shared prefix, activation checkpointing", "train_naive"),
    "step_beta0": ("(c) full GRPO step, beta 0", None),
    "step_beta0_lowmem": ("(c) full GRPO step, beta 0, low-memory setting", None),
    "step_beta004_lowmem": ("(c) full GRPO step, beta 0.04 (reference model), low-memory setting", None),
    "step_gail_lowmem": ("(c) full GRPO step, beta 0, discriminator (GAIL_USE=1), low-memory setting", None),
}
# Scoring one step's completions with the discriminator; both in one process (phase "disc").
DISC_PHASES = {
    "disc_upstream": ("(e) disc scoring, upstream way: one text per completion through the encoder", None),
    "disc_table": ("(e) disc scoring, disc.py: states once, options once, logit table", "disc_upstream"),
}
DISC_PROMPTS = 8


def parse_args(argv):
    return parse_options(argv, {"runs": 5, "prompts": 2, "generations": 4, "new_tokens": 32, "prompt_mode": "think",
                                "model": checkpoint.EMBEDDED_MODEL, "threads": 0, "phase": ""})


def parse_options(argv, defaults):
    """`--key=value` arguments over `defaults`, each value cast to its default's type."""
    args = dict(defaults)
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in args:
            raise SystemExit(f"[bench] unknown option {arg}; known: {', '.join(sorted(args))}")
        try:
            args[key] = type(args[key])(value)
        except ValueError:
            raise SystemExit(f"[bench] {arg}: expected {type(args[key]).__name__}") from None
    return args


def world_and_model_path(args):
    """This machine's single-process world (CUDA if there is one) and `--model` resolved, with
    `--threads` torch threads if set."""
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    world = distributed.single_process("cuda" if torch.cuda.is_available() else "cpu")
    return world, checkpoint.resolve_model(args["model"], world)


def trainable_model(args):
    """(world, the `--model` model, trainable, fp32 master weights; its tokenizer)."""
    world, path = world_and_model_path(args)
    return world, checkpoint.load_model(path, world.device, trainable=True), checkpoint.load_tokenizer(path)


def setup(args):
    world, path = world_and_model_path(args)
    cfg = tg.Config(prompt_mode=args["prompt_mode"], num_generations=args["generations"],
                    max_completion_length=args["new_tokens"], prompts_per_step=args["prompts"],
                    learning_rate=1e-6, max_steps=1000, dataset=str(data.DATA_DIR / "gun_control.jsonl"))
    train_rows, _ = data.load_examples(cfg.dataset, cfg.val_fraction, cfg.seed, log=lambda msg: None)
    return world, path, cfg, train_rows


def prompt_texts(tokenizer, train_rows, cfg):
    prompt = prompts.PromptFormat.of(cfg)
    return [prompt.text(tokenizer, row) for row in train_rows[:cfg.prompts_per_step]]


def timed(fn, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def embedded_tokens(model, forward):
    """Tokens the model computes in `forward` (pads included), counted at the input embedding."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    with torch.no_grad():
        forward()
    hook.remove()
    return sum(seen)


def run_phase(args):
    phase = args["phase"]
    world, path, cfg, train_rows = setup(args)
    model = checkpoint.load_model(path, world.device, trainable=True, checkpointing=phase.endswith(("_ckpt", "_lowmem")))
    tokenizer = checkpoint.load_tokenizer(path)
    texts = prompt_texts(tokenizer, train_rows, cfg)
    G = cfg.num_generations
    extra = {}
    if phase.startswith("generate"):
        model.eval()

        def fn():
            torch.manual_seed(0)
            out = rollout.generate(model, tokenizer, texts, G, cfg.max_completion_length,
                                   shared_prefix=phase.endswith("shared"))
            extra["completion_tokens"] = int(out.completion_mask.sum())
    elif phase.startswith("train"):
        torch.manual_seed(0)
        out = rollout.generate(model, tokenizer, texts, G, cfg.max_completion_length)
        batch = {"prompt_ids": out.prompt_ids, "prompt_mask": out.prompt_mask,
                 "completion_ids": out.completion_ids, "completion_mask": out.completion_mask}
        shared = "shared" in phase
        model.train()
        extra["tokens_unique"] = int(out.prompt_mask.sum() + out.completion_mask.sum())
        extra["tokens_processed"] = embedded_tokens(model, lambda: grpo.completion_logprobs(
            model, batch, cfg.temperature, shared_prefix=shared))
        extra["prompt_tokens"] = out.prompt_mask.sum(dim=1).tolist()

        def fn():
            model.zero_grad(set_to_none=True)
            logp = grpo.completion_logprobs(model, batch, cfg.temperature, shared_prefix=shared)
            (logp * batch["completion_mask"]).sum().backward()
    elif phase == "disc":
        return run_disc_phase(args, model, tokenizer, train_rows, cfg)
    else:
        cfg.beta = 0.04 if phase.startswith("step_beta004") else 0.0
        cfg.gail_use = phase.startswith("step_gail")
        if phase.endswith("_lowmem"):  # the activations of one prompt at a time
            cfg.gradient_accumulation_steps = cfg.prompts_per_step
        ref_model = checkpoint.load_model(path, world.device, trainable=False) if cfg.beta else None
        optimizer, scheduler = grpo.make_optimizer(model, cfg)
        policy = grpo.Policy(model, cfg.shared_prefix)
        disc_trainer = disc.DiscriminatorTrainer(disc.build("", model, tokenizer, world.device, cfg.seed), train_rows,
                                                 cfg, world.rank) if cfg.gail_use else None
        step = iter(range(10 ** 6))

        def fn():
            batch, _, _ = tg.collect_rollouts(model, tokenizer, train_rows, next(step), cfg, world, disc_trainer)
            tg.add_logprobs(model, ref_model, batch, cfg, world)
            model.train()
            grpo.update(policy, optimizer, scheduler, batch, cfg, world)
            if disc_trainer is not None:
                disc_trainer.step()
    times = timed(fn, args["runs"])
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"phase": phase, "times": times, "peak_rss_gb": peak_kb / 2 ** 20, **extra}))


def upstream_disc_text(row, choice):
    """One text per completion, as upstream's discriminator saw it (`_render_disc_text`): viewer,
    the prompt's state text, the slate's names and the chosen item's name."""
    names = "\n".join(f"{i}. {prompts.option_content(item)}" for i, item in enumerate(row["slate_items_json"], 1))
    return (f"VIEWER: {row.get('viewer_profile_sentence') or ''}\nSTATE:\n{prompts.render_user_prompt(row)}\n"
            f"SLATE (names):\n{names}\nACTION_NAME: {prompts.option_content(row['slate_items_json'][choice - 1])}")


def run_disc_phase(args, model, tokenizer, train_rows, cfg):
    import random

    discriminator = disc.build("", model, tokenizer, torch.device("cpu"), seed=0).eval()
    rows = train_rows[:DISC_PROMPTS]
    G = cfg.num_generations
    rng = random.Random(0)
    choices = [rng.randint(1, rows[i // G]["n_options"]) for i in range(len(rows) * G)]
    texts = [upstream_disc_text(rows[i // G], c) for i, c in enumerate(choices)]

    def upstream():  # the same encoder and head width, one sequence per completion (512 tokens, as upstream)
        with torch.no_grad():
            ids, mask = discriminator.tokenize(texts, 512)
            pooled = discriminator.encoder(ids, mask[:, :512])
            return discriminator.head(torch.cat([pooled, pooled, pooled], dim=-1))

    def table():
        return disc.choice_rewards(discriminator, rows, choices, G, "prob", 1.0, 5.0)

    discriminator.encoder.position = torch.nn.Embedding(512, disc.WIDTH)  # room for 512-token texts
    results = {"disc_upstream": timed(upstream, args["runs"]), "disc_table": timed(table, args["runs"])}
    print(json.dumps({"phase": "disc", "results": results,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))


def main(argv):
    args = parse_args(argv)
    if args["phase"]:
        return run_phase(args)
    results = {}
    for phase in list(PHASES) + ["disc"]:
        cmd = [sys.executable, "-m", "bench.steps", f"--phase={phase}"] + [a for a in argv if not a.startswith("--phase")]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"{phase} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        parts = {name: {"times": t, "peak_rss_gb": result["peak_rss_gb"]} for name, t in result["results"].items()} \
            if phase == "disc" else {phase: result}
        for name, part in parts.items():
            results[name] = part
            print(f"[bench] {name}: median {statistics.median(part['times']):.3f}s", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\nbench.steps {' '.join(argv)} | {device} | torch {torch.__version__} | "
          f"B={args['prompts']} G={args['generations']} new_tokens={args['new_tokens']} "
          f"prompt_mode={args['prompt_mode']} | median of {args['runs']} runs after 1 warm-up\n")
    print("| phase | median s | min–max s | vs baseline | peak RSS GB |")
    print("|---|---:|---:|---:|---:|")
    for phase, (label, baseline) in {**PHASES, **DISC_PHASES}.items():
        t = results[phase]["times"]
        ratio = f"{statistics.median(t) / statistics.median(results[baseline]['times']):.2f}×" if baseline else \
            ("baseline" if phase.endswith(("plain", "naive", "upstream")) else "—")
        print(f"| {label} | {statistics.median(t):.3f} | {min(t):.3f}–{max(t):.3f} | {ratio} | "
              f"{results[phase]['peak_rss_gb']:.2f} |")
    naive, shared = results["train_naive"], results["train_shared"]
    print(f"\nprompt tokens {shared['prompt_tokens']}; training tokens processed/unique: "
          f"naive {naive['tokens_processed']}/{naive['tokens_unique']} = "
          f"{naive['tokens_processed'] / naive['tokens_unique']:.2f}, shared prefix "
          f"{shared['tokens_processed']}/{shared['tokens_unique']} = "
          f"{shared['tokens_processed'] / shared['tokens_unique']:.3f}; discriminator scoring: "
          f"{DISC_PROMPTS} prompts x {args['generations']} completions")


if __name__ == "__main__":
    errors.run(main, sys.argv[1:])
