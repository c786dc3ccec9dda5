"""How much a simulator can learn from what the rows carry, split by split: on each participant
split's held-out rows (the trainer's split, seeded), per issue, the log-loss of the click's position
prior against uniform, and of the opinion shift's direction prior against the pre-study-index
logistic, the initial viewpoint's table (all fit on that split's training participants, opinions.py)
and uniform (a script, not a test; data only, a few seconds).

    python -m bench.splits [--seeds=20 | --seeds=42,7] [--dataset=FILES] [--val_fraction=0.1]   # from the repository root

A model whose slot preferences stay close to the prior can beat uniform only where the prior does,
and its opinion can beat the direction prior only where something in the prompt predicts it better:
the rows in which neither says where those acceptance lines cannot hold.
"""
import sys

import choices
import data
import errors
import opinions
import schema
from bench.steps import parse_options


def split_scores(dataset, val_fraction, seed):
    """{issue: {"rows", "prior", "uniform"[, "opinion_rows", "direction_prior", "index_logistic",
    "viewpoint_table", "opinion_uniform"]}}: log-loss on one split's held-out participants (the opinion's on their
    labelled rows, as the evaluation scores its baselines: opinions.opinion_metrics)."""
    train_rows, val_rows = data.load_examples(dataset, val_fraction, seed, log=lambda msg: None)
    prior = choices.position_prior(train_rows)
    uniform = [1 / len(schema.OPINION_LABELS)] * len(schema.OPINION_LABELS)  # as the model: the baselines come beside it
    opinion = opinions.opinion_metrics(val_rows, [uniform] * len(val_rows), train_rows, "exact") or {"by_issue": {}}
    out = {}
    for issue in sorted({row.get("issue") for row in val_rows}):
        rows = [row for row in val_rows if row.get("issue") == issue]
        out[issue] = {"rows": len(rows),
                      "prior": choices.distribution_scores(rows, [prior(r["n_options"]) for r in rows])["logloss"],
                      "uniform": choices.distribution_scores(rows, [[1 / r["n_options"]] * r["n_options"]
                                                                    for r in rows])["logloss"]}
        scores = opinion["by_issue"].get(str(issue))  # the evaluation's own by-issue scores
        if scores:
            out[issue].update(opinion_rows=scores["model"]["n"], direction_prior=scores["prior"]["logloss"],
                              index_logistic=scores["baseline"]["logloss"],
                              viewpoint_table=scores["viewpoint"]["logloss"], opinion_uniform=scores["uniform"]["logloss"])
    return out


def seeds_of(text):
    """"20" -> seeds 0..19; "42,7" -> those seeds."""
    return [int(s) for s in text.split(",")] if "," in text else list(range(int(text)))


def table(title, scores, cell):
    issues = sorted({issue for split in scores.values() for issue in split})
    print(title)
    print("| seed | " + " | ".join(str(issue) for issue in issues) + " |")
    print("|---|" + "---|" * len(issues))
    for seed, split in scores.items():
        print(f"| {seed} | " + " | ".join(cell(split[i]) if i in split and cell(split[i]) else "" for i in issues) + " |")
    return issues


def run(args):
    scores = {seed: split_scores(args["dataset"], args["val_fraction"], seed) for seed in seeds_of(args["seeds"])}
    issues = table("click, log-loss (nats) on each split's held-out participants: position prior / uniform (rows)",
                   scores, lambda s: f"{s['prior']:.3f} / {s['uniform']:.3f} ({s['rows']})")
    for issue in issues:
        present = [split[issue] for split in scores.values() if issue in split]
        wins = sum(s["prior"] < s["uniform"] for s in present)
        print(f"{issue}: the prior beats uniform on {wins} of {len(present)} splits")
    print()
    table("opinion shift, log-loss (nats) on the same participants' labelled rows: direction prior / "
          "pre-study-index logistic / initial viewpoint's table / uniform (rows)", scores,
          lambda s: "opinion_rows" in s and f"{s['direction_prior']:.3f} / {s['index_logistic']:.3f} / "
                                            f"{s['viewpoint_table']:.3f} / {s['opinion_uniform']:.3f} ({s['opinion_rows']})")
    for name, key in (("the logistic", "index_logistic"), ("the viewpoint's table", "viewpoint_table")):
        for issue in issues:
            present = [split[issue] for split in scores.values() if "opinion_rows" in split.get(issue, {})]
            wins = sum(s[key] < s["direction_prior"] for s in present)
            print(f"{issue}: {name} beats the direction prior on {wins} of {len(present)} splits")
        both = sum(all(s[key] < s["direction_prior"] for s in split.values() if "opinion_rows" in s)
                   for split in scores.values())
        print(f"{name}, on every issue at once: {both} of {len(scores)} splits")


if __name__ == "__main__":
    errors.run(lambda argv: run(parse_options(argv, {"seeds": "20", "dataset": "", "val_fraction": 0.1})), sys.argv[1:])
