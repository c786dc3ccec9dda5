"""How much a simulator can learn from click positions, split by split: on each participant split's
held-out rows (the trainer's split, seeded), the log-loss of the position prior fit on that split's
training rows against uniform, per issue (a script, not a test; data only, a few seconds).

    python -m bench.splits [--seeds=20] [--dataset=FILES] [--val_fraction=0.1]   # from the repository root

A model whose slot preferences stay close to the prior can beat uniform only where the prior does:
the rows in which it does not say where that acceptance line cannot hold.
"""
import sys

import choices
import data
import errors
from bench.steps import parse_options


def split_scores(dataset, val_fraction, seed):
    """{issue: (rows, prior log-loss, uniform log-loss)} on one split's held-out participants."""
    train_rows, val_rows = data.load_examples(dataset, val_fraction, seed, log=lambda msg: None)
    prior = choices.position_prior(train_rows)
    out = {}
    for issue in sorted({row.get("issue") for row in val_rows}):
        rows = [row for row in val_rows if row.get("issue") == issue]
        prior_scores = choices.distribution_scores(rows, [prior(r["n_options"]) for r in rows])
        uniform_scores = choices.distribution_scores(rows, [[1 / r["n_options"]] * r["n_options"] for r in rows])
        out[issue] = (len(rows), prior_scores["logloss"], uniform_scores["logloss"])
    return out


def run(args):
    scores = [split_scores(args["dataset"], args["val_fraction"], seed) for seed in range(args["seeds"])]
    issues = sorted({issue for split in scores for issue in split})
    print("log-loss (nats) on each split's held-out participants: position prior / uniform (rows)")
    print("| seed | " + " | ".join(str(issue) for issue in issues) + " |")
    print("|---|" + "---|" * len(issues))
    for seed, split in enumerate(scores):
        cells = [f"{split[i][1]:.3f} / {split[i][2]:.3f} ({split[i][0]})" if i in split else "" for i in issues]
        print(f"| {seed} | " + " | ".join(cells) + " |")
    for issue in issues:
        present = [split[issue] for split in scores if issue in split]
        wins = sum(prior_loss < uniform_loss for _, prior_loss, uniform_loss in present)
        print(f"{issue}: the prior beats uniform on {wins} of {len(present)} splits")


if __name__ == "__main__":
    errors.run(lambda argv: run(parse_options(argv, {"seeds": 20, "dataset": "", "val_fraction": 0.1})), sys.argv[1:])
