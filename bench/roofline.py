"""Roofline of the machine at hand for the default job: the matmul throughput of this CPU (or GPU) at
the model's own shapes, in fp32 and in bf16, next to the exact evaluation's and the cloning step's
rows per second, each phase shown as a fraction of those limits (a script, not a test).

    python -m bench.roofline [--rows=8] [--bc_steps=3] [--runs=5] [--model=PATH_OR_ID] [--threads=N]

Matmuls: one decoder layer's (q, k, v, o, gate, up, down) on a prompt-length activation, timed
`runs` times after a warm-up, median. Phases (fp32, then under bf16 autocast): the exact choice
and opinion distributions of `rows` held-out answer-mode rows (one tree-masked forward a row, choices.py), and
`bc_steps` cloning steps of 2 rows with the default recipe's label smoothing (grpo.behaviour_cloning);
and in fp32 the click's distribution and cloning target alone (what the opinion's branches cost).
A phase's model FLOPs come from bench.gpu.forward_flops (x 3 for forward + backward); its fraction
of the limit is those FLOPs per second over the matmul throughput. Also printed: the rows' log-loss of
the human click and of the opinion in fp32, in bf16 (the head in fp32, `cast_lm_head_to_fp32`, as the
trainer and the evaluation run it) and in bf16 with autocast's bf16 head, and how far each bf16
distribution is from fp32's (`--model=CHECKPOINT --rows=111`: what bf16 does to a trained model's
held-out score). Last, where the recipe's bf16 phases spend their time: one more pass of each
(4 rows; one cloning step after a warm-up) under torch.profiler, the ops' own time split into
matmuls (with the GFLOP/s they reach), attention and everything else (norms, activations, casts,
the optimizer, the profiler's own overhead); and the CPU recipe's evaluations and cloning in
TFLOP at these rates, with the minutes they would take at the bf16 limit.
"""
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import checkpoint
import choices
import data
import errors
import grpo
import opinions
import prompts
import rollout
import train_grail as tg
from bench.gpu import forward_flops
from bench.steps import parse_options, trainable_model


CPU_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "cpu_default.yaml"


def parse_args(argv):
    return parse_options(argv, {"rows": 8, "bc_steps": 3, "runs": 5, "model": checkpoint.EMBEDDED_MODEL,
                                "threads": 0})


def layer_shapes(config, tokens):
    """(m, k, n) of one decoder layer's matmuls on `tokens` activations."""
    hidden, inner = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    return [(tokens, hidden, hidden), (tokens, hidden, kv), (tokens, hidden, kv), (tokens, hidden, hidden),
            (tokens, hidden, inner), (tokens, hidden, inner), (tokens, inner, hidden)]


def matmul_gflops(shapes, dtype, runs, device):
    """GFLOP/s of the shapes' matmuls, all of them per timed run (median of `runs`)."""
    pairs = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
             for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)

    def once():
        for a, b in pairs:
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()

    once()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return flops / statistics.median(times) / 1e9


def precision(bf16, device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def exact_phase(model, tokenizer, texts, rows, stop_ids, bf16, device, opinion=True, ops=None):
    """(rows per second, GFLOP per row, the (click, opinion) log-distributions) of the exact evaluation on `rows`:
    the click's and (`opinion`) the opinion's branches, as the evaluation runs it; `ops` (an OpTimes)
    records the timed rows."""
    def gold(row):
        return row["gold_index"] if opinion else None

    ops = ops or OpTimes(enabled=False)
    with precision(bf16, device):
        choices.answer_logprobs(model, tokenizer, texts[0], rows[0]["n_options"], stop_ids, gold(rows[0]))
        t0 = time.perf_counter()  # after a warm-up
        with ops:
            dists = [choices.answer_logprobs(model, tokenizer, text, row["n_options"], stop_ids, gold(row))
                     for text, row in zip(texts, rows)]
        seconds = time.perf_counter() - t0
    flops = 0
    for text, row in zip(texts, rows):  # every branch of the tree (their mean width)
        branches = choices.answer_branches(tokenizer, row["n_options"], gold(row))
        prompt_tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
        width = sum(len(ids) for ids, _, _ in branches) / len(branches)
        scored = sum(len(ids) - start for ids, start, _ in branches)
        flops += forward_flops(model, prompt_tokens, width, len(branches), logits=scored)
    return len(rows) / seconds, flops / len(rows) / 1e9, dists


def cloning_phase(model, tokenizer, texts, rows, train_rows, steps, bf16, world, ops=None):
    """(rows per second, GFLOP per row) of `steps` cloning steps of 2 rows (forward + backward), after
    one that warms up (and makes the optimizer's state); `ops` (an OpTimes) records the timed steps."""
    cfg = tg.Config(prompt_mode="answer", bc_steps=steps + 1, bc_learning_rate=1e-12, bf16=bf16, cpu_bf16=bf16, prompts_per_step=2,
                    bc_label_smoothing=0.8, bc_opinion_smoothing=0.5)
    prior, direction_prior = choices.position_prior(train_rows), opinions.direction_prior(train_rows)
    end = rollout.stop_token_ids(model, tokenizer)[0]
    batches = [(texts[i:i + 2], [choices.cloning_targets(tokenizer, r, prior, cfg.bc_label_smoothing, direction_prior,
                                                         cfg.bc_opinion_smoothing, end) for r in rows[i:i + 2]])
               for i in range(0, 2 * (steps + 1), 2)]
    policy = grpo.Policy(model, True)
    times, ops = [], ops or OpTimes(enabled=False)

    def timed_batches():
        for i, batch in enumerate(batches):
            times.append(time.perf_counter())
            if i == 1:
                ops.start()
            yield batch
        ops.stop()
        times.append(time.perf_counter())

    grpo.behaviour_cloning(policy, model, tokenizer, timed_batches(), cfg, world)
    seconds = times[-1] - times[1]  # the first step warms up
    flops = 0
    for prompt_texts, targets in batches[1:]:
        batch = grpo.cloning_batch(tokenizer, prompt_texts, targets, end, world.device)
        completions = batch["completion_mask"].sum(dim=1).view(len(prompt_texts), -1)
        for mask, lengths in zip(batch["prompt_mask"], completions):
            flops += 3 * forward_flops(model, int(mask.sum()), int(lengths.max()), len(lengths),
                                       logits=int(lengths.sum()))
    return 2 * steps / seconds, flops / (2 * steps) / 1e9


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


class OpTimes:
    """The ops' own time over a `with` block, under torch.profiler (nothing when not `enabled`):
    split() gives {matmul, attention, other: shares; matmul_gflops: what the matmuls reach}."""
    def __init__(self, enabled=True):
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) \
            if enabled else None

    def start(self):
        if self.profiler:
            self.profiler.start()

    def stop(self):
        if self.profiler:
            self.profiler.stop()

    def __enter__(self):
        self.start()

    def __exit__(self, *exc):
        self.stop()

    def split(self):
        seconds, matmul_flops = {"matmul": 0.0, "attention": 0.0, "other": 0.0}, 0
        for event in self.profiler.key_averages():
            kind = ("matmul" if event.key in MATMUL_OPS else
                    "attention" if "scaled_dot_product" in event.key or "flash_attention" in event.key else "other")
            seconds[kind] += event.self_cpu_time_total / 1e6
            matmul_flops += event.flops if kind == "matmul" else 0
        total = sum(seconds.values())
        return {**{kind: t / total for kind, t in seconds.items()},
                "matmul_gflops": matmul_flops / max(seconds["matmul"], 1e-9) / 1e9}


def precision_scores(dists, rows):
    """Each precision's log-loss of the click and the opinion (labelled rows), scored as eval.json
    scores them, and its largest distance from fp32's: |d log p(gold click)| and |d p| over every
    click and opinion branch."""
    labelled = [i for i, row in enumerate(rows) if opinions.label_index(row)]

    def logloss(name):
        click = choices.distribution_scores(rows, [c.exp().tolist() for c, _ in dists[name]])["logloss"]
        opinion = opinions.opinion_scores([rows[i] for i in labelled],
                                          [dists[name][i][1].exp().tolist() for i in labelled])["logloss"] \
            if labelled else float("nan")
        return click, opinion

    out = {}
    for name in dists:
        pairs = list(zip(dists["fp32"], dists[name]))
        out[name] = {"logloss": logloss(name),
                     "max_abs_logp_gold_diff": max(abs(a[0][r["gold_index"] - 1] - b[0][r["gold_index"] - 1]).item()
                                                   for (a, b), r in zip(pairs, rows)),
                     "max_abs_prob_diff": max(max((a[0].exp() - b[0].exp()).abs().max().item(),
                                                  (a[1].exp() - b[1].exp()).abs().max().item()) for a, b in pairs)}
    return out


def run(args):
    world, model, tokenizer = trainable_model(args)
    train_rows, val_rows = data.load_examples("", 0.1, 42, log=lambda msg: None)
    recipe = tg.parse_config([f"--config={CPU_RECIPE}"], {})[0]
    prompt = prompts.PromptFormat.of(recipe)
    rows = val_rows[:args["rows"]]
    texts = [prompt.text(tokenizer, row) for row in rows]
    bc_rows = train_rows[:2 * (args["bc_steps"] + 1)]
    bc_texts = [prompt.text(tokenizer, row) for row in bc_rows]
    tokens = round(statistics.median(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts))
    shapes = layer_shapes(model.config, tokens)
    limits = {"fp32": matmul_gflops(shapes, torch.float32, args["runs"], world.device),
              "bf16": matmul_gflops(shapes, torch.bfloat16, args["runs"], world.device)}
    stop_ids = rollout.stop_token_ids(model, tokenizer)
    model.eval()
    phases, dists = {}, {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        rate, gflop, dists[name] = exact_phase(model, tokenizer, texts, rows, stop_ids, bf16, world.device)
        phases[f"exact evaluation, {name}"] = (rate, gflop)
    autocast_head = checkpoint.load_model(checkpoint.resolve_model(args["model"], world), world.device,
                                          trainable=False, fp32_head=False)
    dists["bf16, bf16 head"] = exact_phase(autocast_head, tokenizer, texts, rows, stop_ids, True, world.device)[2]
    del autocast_head
    phases["exact evaluation, fp32, the click alone"] = exact_phase(model, tokenizer, texts, rows, stop_ids, False,
                                                                    world.device, opinion=False)[:2]
    for name, bf16 in (("fp32", False), ("bf16", True)):
        phases[f"cloning step, {name}"] = cloning_phase(model, tokenizer, bc_texts, bc_rows, train_rows,
                                                        args["bc_steps"], bf16, world)
    unlabelled = [dict(row, opinion_direction=None) for row in bc_rows]  # no opinion target
    phases["cloning step, fp32, the click alone"] = cloning_phase(model, tokenizer, bc_texts, unlabelled, train_rows,
                                                                  args["bc_steps"], False, world)
    model.eval()
    evaluation, cloning = OpTimes(), OpTimes()
    exact_phase(model, tokenizer, texts[:4], rows[:4], stop_ids, True, world.device, ops=evaluation)
    cloning_phase(model, tokenizer, bc_texts[:4], bc_rows[:4], train_rows, 1, True, world, ops=cloning)
    split = {"exact evaluation, bf16": evaluation.split(), "cloning step, bf16": cloning.split()}
    return {"machine": machine(world.device), "prompt_tokens": tokens, "limits_gflops": limits, "phases": phases,
            "rows": len(rows), "precision": precision_scores(dists, rows), "time_split": split,
            "job": job_budget(recipe, len(val_rows), phases)}


def job_budget(recipe, eval_rows, phases):
    """The CPU recipe's model FLOPs at the measured GFLOP a row: its evaluations of the held-out rows
    (before and after training) and its cloning rows (GRPO's two steps are left out)."""
    evaluations, cloned = recipe.eval_on_start + recipe.eval_on_end, recipe.bc_steps * recipe.prompts_per_step
    gflop = (evaluations * eval_rows * phases["exact evaluation, bf16"][1] + cloned * phases["cloning step, bf16"][1])
    return {"evaluations": evaluations, "eval_rows": eval_rows, "cloned_rows": cloned, "tflop": gflop / 1e3}


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if sys.platform == "linux" else platform.processor()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def table(result):
    fp32, bf16 = result["limits_gflops"]["fp32"], result["limits_gflops"]["bf16"]
    lines = [f"Machine: {result['machine']}; one decoder layer's matmuls at {result['prompt_tokens']} tokens: "
             f"{fp32:.0f} GFLOP/s fp32, {bf16:.0f} GFLOP/s bf16", "",
             "| phase | rows/s | GFLOP a row | GFLOP/s | of the fp32 limit | of the bf16 limit |",
             "|---|---|---|---|---|---|"]
    for name, (rate, gflop) in result["phases"].items():
        achieved = rate * gflop
        lines.append(f"| {name} | {rate:.2f} | {gflop:.0f} | {achieved:.0f} | {achieved / fp32:.2f} | "
                     f"{achieved / bf16:.2f} |")
    lines += ["", f"The exact evaluation's precision on the same {result['rows']} held-out rows "
              "(bf16: the head in fp32, as the trainer runs it):", "",
              "| precision | click log-loss | opinion log-loss | max abs d log p(gold click) | max abs d p |",
              "|---|---|---|---|---|"]
    for name, score in result["precision"].items():
        click, opinion = score["logloss"]
        lines.append(f"| {name} | {click:.4f} | {opinion:.4f} | {score['max_abs_logp_gold_diff']:.4f} | "
                     f"{score['max_abs_prob_diff']:.4f} |")
    lines += ["", "Where the bf16 phases' time goes (torch.profiler, the ops' own time; its overhead is in "
              "\"other\"):", "",
              "| phase | matmuls | their GFLOP/s | of the bf16 limit | attention | other |",
              "|---|---|---|---|---|---|"]
    for name, split in result["time_split"].items():
        lines.append(f"| {name} | {split['matmul']:.2f} | {split['matmul_gflops']:.0f} | "
                     f"{split['matmul_gflops'] / bf16:.2f} | {split['attention']:.2f} | {split['other']:.2f} |")
    job = result["job"]
    lines += ["", f"The CPU recipe's evaluations and cloning ({job['evaluations']} × {job['eval_rows']} held-out rows, "
              f"{job['cloned_rows']} cloning rows) at these GFLOP a row: {job['tflop']:.1f} TFLOP, "
              f"{job['tflop'] * 1e3 / bf16 / 60:.1f} min at the bf16 limit."]
    return "\n".join(lines)


def main(argv):
    print(table(run(parse_args(argv))))


if __name__ == "__main__":
    errors.run(main, sys.argv[1:])
