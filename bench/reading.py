"""Can cloning teach the model to read the viewer? The easiest version of the opinion's task: the
opinion alone, with hard labels, cloned on one issue's labelled training rows (`steps` steps of 2
rows, grpo.behaviour_cloning as the warm start runs it, bf16 autocast as `cpu_bf16`), then
p(direction | the prompt, the human's click) on that issue's held-out participants (one row each),
before and after, by initial viewpoint beside what those people did, the direction prior and the
viewpoint table (opinions.py). A script, not a test.

    python -m bench.reading [--issue=gun_control] [--steps=100] [--lr=2e-4] [--seed=7] [--model=PATH_OR_ID] [--threads=N]

On gun control the initial viewpoint nearly decides the direction ("Opposes stricter gun laws":
increase, "Supports stricter gun laws": decrease, on the training participants of every split), so
a model that reads the profile's "Initial Viewpoint:" line must move its distribution with it.
"""
import statistics
import sys
import time

import torch
from tqdm import tqdm

import checkpoint
import choices
import data
import errors
import grpo
import opinions
import prompts
import rollout
import train_grail as tg
from bench.roofline import machine
from bench.steps import parse_options, trainable_model


def parse_args(argv):
    return parse_options(argv, {"issue": "gun_control", "steps": 100, "lr": 2e-4, "seed": 7,
                                "model": checkpoint.EMBEDDED_MODEL, "threads": 0})


@torch.no_grad()
def opinion_distributions(model, tokenizer, prompt, rows):
    """p(direction | the prompt, the human's click) of each row, exact (fp32, as the evaluation)."""
    model.eval()
    stop_ids = rollout.stop_token_ids(model, tokenizer)
    return [choices.answer_logprobs(model, tokenizer, prompt.text(tokenizer, row), row["n_options"], stop_ids,
                                    row["gold_index"])[1].exp().tolist() for row in tqdm(rows, desc="held-out opinions")]


def by_viewpoint(rows, distributions):
    """{viewpoint: (participants, {direction: the humans' share}, {direction: the mean renormalised p})}."""
    out = {}
    for viewpoint in sorted({row.get("initial_viewpoint") or "" for row in rows}):
        idx = [i for i, row in enumerate(rows) if (row.get("initial_viewpoint") or "") == viewpoint]
        humans = {d: statistics.fmean(rows[i]["opinion_direction"] == d for i in idx) for d in opinions.OPINION_LABELS}
        mean = [statistics.fmean(col) for col in zip(*(choices.renormalised(distributions[i]) for i in idx))]
        out[viewpoint] = (len(idx), humans, dict(zip(opinions.OPINION_LABELS, mean)))
    return out


def run(args):
    world, model, tokenizer = trainable_model(args)
    train_rows, val_rows = data.load_examples("", 0.1, args["seed"], log=lambda msg: None)
    train = [r for r in train_rows if r.get("issue") == args["issue"] and r.get("opinion_direction")]
    held_out = opinions.participants([r for r in val_rows if r.get("issue") == args["issue"]])
    if not train or not held_out:
        raise SystemExit(f"[bench] no labelled rows of issue {args['issue']!r} on both sides of split {args['seed']}")
    cfg = tg.Config(prompt_mode="answer", bc_steps=args["steps"], bc_learning_rate=args["lr"], prompts_per_step=2,
                    cpu_bf16=True, seed=args["seed"])
    prompt = prompts.PromptFormat.of(cfg)
    end = rollout.stop_token_ids(model, tokenizer)[0]
    direction = opinions.direction_prior(train)  # mixed in with weight 0: hard labels

    def batches():  # the opinion's targets alone (scored after the human's click)
        for step in tqdm(range(args["steps"]), desc="cloning the opinion", dynamic_ncols=True):
            rows = [train[i] for i in data.step_prompts(len(train), 2, step, f"{args['seed']}:reading")]
            yield [prompt.text(tokenizer, r) for r in rows], [
                choices.opinion_targets(tokenizer, r, direction, 0.0, end) for r in rows]

    before = opinion_distributions(model, tokenizer, prompt, held_out)
    t0 = time.perf_counter()
    losses = [s["loss"] for s in grpo.behaviour_cloning(grpo.Policy(model, True), model, tokenizer, batches(), cfg,
                                                         world)]
    seconds = time.perf_counter() - t0
    after = opinion_distributions(model, tokenizer, prompt, held_out)
    fitted = {"direction prior": opinions.direction_prior(train_rows),
              "viewpoint table": opinions.viewpoint_baseline(train_rows)}
    scores = {"untrained": opinions.opinion_scores(held_out, before), "cloned": opinions.opinion_scores(held_out, after),
              **{name: opinions.opinion_scores(held_out, [f(r) for r in held_out]) for name, f in fitted.items()}}
    return {"machine": machine(world.device), "args": args, "train_rows": len(train), "participants": len(held_out),
            "seconds": seconds, "loss": (statistics.fmean(losses[:5]), statistics.fmean(losses[-5:])),
            "scores": scores, "viewpoints": by_viewpoint(held_out, after)}


def table(result):
    a = result["args"]
    lines = [f"Machine: {result['machine']}", f"{a['issue']}, split {a['seed']}: {a['steps']} steps of 2 rows at "
             f"{a['lr']} on {result['train_rows']} labelled training rows ({result['seconds']:.0f} s, cross-entropy "
             f"{result['loss'][0]:.3f} -> {result['loss'][1]:.3f}); {result['participants']} held-out participants", "",
             "| | log-loss | spread |", "|---|---|---|"]
    lines += [f"| {name} | {s['logloss']:.3f} | {s['spread']:.3f} |" for name, s in result["scores"].items()]
    lines += ["", "| initial viewpoint | participants | humans: " + " / ".join(opinions.OPINION_LABELS) +
              " | cloned: mean p |", "|---|---|---|---|"]
    for viewpoint, (n, humans, mean) in result["viewpoints"].items():
        lines.append(f"| {viewpoint} | {n} | " + " / ".join(f"{humans[d]:.2f}" for d in opinions.OPINION_LABELS) +
                     " | " + " / ".join(f"{mean[d]:.2f}" for d in opinions.OPINION_LABELS) + " |")
    return "\n".join(lines)


def main(argv):
    print(table(run(parse_args(argv))))


if __name__ == "__main__":
    errors.run(main, sys.argv[1:])
