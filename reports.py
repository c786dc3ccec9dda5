"""Markdown reports of training runs, with plots.

    python reports.py RUN_DIR [RUN_DIR ...] [--out=DIR]

One run -> reports/<run>/README.md; several -> reports/compare-<run>-<run>.../README.md with the runs
side by side (e.g. accuracy vs calibration vs GAIL_USE=1). The headline is the simulator's choice
distribution scored on held-out people (log-loss, Brier, position TVD, valid mass) beside the
untrained model, the position prior and uniform, and the opinion shift's distribution beside the
untrained model, the direction prior, the pre-study-index logistic and uniform; then the PNGs:
training curves, click positions (model vs humans vs prior), calibration and the opinion's shares and
calibration; then accuracy in every view beside positional baselines.
`eval_summary` is the one renderer of an evaluation: the trainer prints it, the report shows it.
"""
import json
import sys
from pathlib import Path

import errors
from outputs import RunFolder

CURVES = [("reward/total/mean", "total reward"), ("reward/calibration/mean", "calibration reward"),
          ("reward/accuracy/mean", "accuracy reward"), ("reward/format/mean", "format reward"),
          ("frac_reward_zero_std", "groups with zero reward spread"), ("kl", "KL to reference"),
          ("completion_length/mean", "completion length")]
SCORES = [("logloss", "log-loss"), ("logloss_renorm", "log-loss (valid, renormalised)"), ("brier", "Brier"),
          ("tvd", "TVD of positions"), ("valid_mass", "valid mass")]


def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def num(x):
    return "" if x is None else f"{x:.3f}"


def with_ci(m):
    lo, hi = m.get("ci95") or (None, None)
    return pct(m["accuracy"]) + (f" [{pct(lo)}, {pct(hi)}]" if lo is not None else "")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # A "|" in a cell (a completion, an issue's name) would end it and shift the row's numbers.
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# One evaluation


def which_rows(ev):
    """How the evaluated rows relate to training: held out unless --eval_split said otherwise."""
    return {"train": "training", "all": "training and held-out"}.get(ev.get("split"), "held-out")


def choice_summary(ev):
    """The headline: the original view's choice distribution beside untrained, prior and uniform."""
    choice = ev["views"].get("original", {}).get("choice")
    if not choice:
        return None
    untrained = ev.get("untrained")
    how = ("exact (one forward per row)" if choice["method"] == "exact"
           else f"estimated from {choice['samples_per_row']} sampled answers per row")
    lines = [[f"**model (step {ev.get('step')})**"] + [f"**{num(choice['model'][k])}**" for k, _ in SCORES]]
    if untrained:
        lines.append([f"untrained (step {untrained['step']})"] + [num(untrained["model"].get(k)) for k, _ in SCORES])
    lines += [["position prior (train, per slate size)"] + [num(choice["prior"][k]) for k, _ in SCORES],
              ["uniform"] + [num(choice["uniform"][k]) for k, _ in SCORES]]
    groups = [[name, g["model"]["n"], f"**{num(g['model']['logloss'])}**",
               num(untrained["by_group"].get(name, {}).get("logloss")) if untrained else "",
               num(g["prior"]["logloss"]), num(g["uniform"]["logloss"]), num(g["model"]["tvd"])]
              for name, g in choice["by_group"].items()]
    c = choice["collapse"]
    flag = (f"**Collapse:** the model puts {pct(c['model_share'])} of its mass on position {c['position']}; "
            f"humans clicked it on {pct(c['human_share'])} of rows." if c["flag"] else "No collapse flag.")
    parts = [f"Choice distribution on {choice['model']['n']} {which_rows(ev)} rows, {how}, original order:\n\n"
             + table(["", *(label for _, label in SCORES)], lines),
             "By issue / study (log-loss):\n\n" + table(
                 ["group", "rows", "model", "untrained", "prior", "uniform", "model TVD"], groups), flag]
    others = [[view, num(m["choice"]["model"]["logloss"]), num(m["choice"]["prior"]["logloss"]),
               num(m["choice"]["uniform"]["logloss"]), num(m["choice"]["model"]["tvd"])]
              for view, m in ev["views"].items() if view != "original" and "choice" in m]
    if others:
        parts.append("Other views (log-loss):\n\n" + table(["view", "model", "prior", "uniform", "model TVD"], others))
    return "\n\n".join(parts)


OPINION_SCORES = [("logloss", "log-loss"), ("participant_logloss", "log-loss per participant"), ("brier", "Brier"),
                  ("valid_mass", "valid mass"), ("accuracy", "accuracy of the mode")]


def opinion_summary(ev):
    """The opinion's distribution (after the human's click) beside untrained, the direction prior,
    the pre-study-index logistic, the initial viewpoint's table and uniform; by issue; and the share
    of each direction."""
    opinion = ev["views"].get("original", {}).get("opinion")
    if not opinion:
        return None
    untrained = (ev.get("untrained") or {}).get("opinion")
    how = ("exact, given the human's click" if opinion["method"] == "exact"
           else f"estimated from {opinion['samples_per_row']} sampled answers per row, after the model's own click")
    lines = [[f"**model (step {ev.get('step')})**"] + [f"**{num(opinion['model'][k])}**" for k, _ in OPINION_SCORES]]
    if untrained:
        lines.append(["untrained"] + [num(untrained["model"].get(k)) for k, _ in OPINION_SCORES])
    lines += [[label] + [num(opinion[key][k]) for k, _ in OPINION_SCORES] for key, label in (
        ("prior", "direction prior (train participants, per issue)"),
        ("baseline", "pre-study index logistic (train participants, per issue)"),
        ("viewpoint", "initial viewpoint's table (train participants, per issue)"), ("uniform", "uniform"))
        if key in opinion]  # eval.json files written before the viewpoint's table lack it
    issues = [[name, g["model"]["n"], g["model"]["participants"], f"**{num(g['model']['logloss'])}**",
               num(untrained["by_issue"].get(name, {}).get("logloss")) if untrained else "",
               num(g["prior"]["logloss"]), num(g["baseline"]["logloss"]),
               num(g.get("viewpoint", {}).get("logloss")), num(g["uniform"]["logloss"]),
               pct(g["no_change_accuracy"]), num(g["model"].get("spread")), num(g["baseline"].get("spread")),
               num(g.get("viewpoint", {}).get("spread"))]
              for name, g in opinion["by_issue"].items()]
    pooled = opinion.get("pooled_issues")  # eval.json files written before it lack the key
    pooled = (f" No training participant holds {', '.join(pooled)}: there every baseline is the direction "
              "prior of all issues pooled, not the issue's own." if pooled else "")
    shares = [[label, pct(opinion["model"]["human_shares"][label]), pct(opinion["model"]["shares"][label]),
               pct(opinion["prior"]["shares"][label])] for label in opinion["model"]["shares"]]
    return "\n\n".join([
        f"Opinion distribution on {opinion['model']['n']} labelled {which_rows(ev)} rows ({opinion['model']['participants']} "
        f"participants), {how}:\n\n" + table(["", *(label for _, label in OPINION_SCORES)], lines),
        "By issue (log-loss; \"no change\": the accuracy of always answering it, as upstream scores it; spread: "
        "the row-to-row standard deviation of p(direction), 0 for the prior, which reads no one)."
        f"{pooled}\n\n" + table(
            ["issue", "rows", "participants", "model", "untrained", "prior", "index logistic", "viewpoint table",
             "uniform", "no change", "model spread", "logistic spread", "viewpoint spread"], issues),
        "Share of each direction (rows):\n\n" + table(["direction", "humans", "model", "prior"], shares)])


def accuracy_summary(ev):
    views = list(ev.get("views", {}))
    predictors = list(dict.fromkeys(name for m in ev["views"].values() for name in m["baselines"]))

    def cell(view, name):
        b = ev["views"][view]["baselines"].get(name)
        return "" if b is None else with_ci(b) if "ci95" in b else pct(b["accuracy"])

    rows = [["**model**"] + [f"**{with_ci(ev['views'][v])}**" for v in views]]
    rows += [[name] + [cell(v, name) for v in views] for name in predictors]
    rows += [["answered"] + [pct(ev["views"][v]["parsed_rate"]) for v in views],
             ["most common answer"] + [f"{ev['views'][v]['most_common_answer']} on "
                                       f"{pct(ev['views'][v]['most_common_answer_share'])}" for v in views]]
    if any("opinion_accuracy" in ev["views"][v] for v in views):  # think mode: the greedy answer's opinion
        rows.append(["opinion of that answer"] + [with_ci(ev["views"][v]["opinion_accuracy"])
                                                  if "opinion_accuracy" in ev["views"][v] else "" for v in views])
    exact = "choice" in ev["views"].get(views[0], {}) and ev["views"][views[0]]["choice"]["method"] == "exact"
    answer = "the mode of the exact distribution" if exact else "greedy decoding"
    return (f"Accuracy [95% CI] of the model's answer ({answer}) by view, beside baselines on the same rows:\n\n"
            + table(["predictor"] + views, rows))


def eval_summary(ev):
    """An eval dict (evaluate.evaluate) as Markdown: the choice-distribution headline, accuracy in
    every view beside the baselines, and the published checkpoints on the same rows."""
    parts = [part for part in (choice_summary(ev), opinion_summary(ev), accuracy_summary(ev)) if part]
    if ev.get("baselines_in_sample_rows"):
        parts.insert(0, f"Note: the baselines (position and direction priors, logistic, viewpoint table) are fit on "
                        f"the training split, which holds the participants of {ev['baselines_in_sample_rows']} of "
                        f"these {ev['n_total']} rows: on those rows they are in-sample, not held out "
                        "(`eval_split=validation` keeps them apart).")
    refs = ev.get("reference_checkpoints") or {}
    if refs:
        parts.append("Published checkpoints on the same rows (original order): " + ", ".join(
            f"{name} {with_ci(r)} (n={r['n']}, most common answer on {pct(r.get('most_common_answer_share'))})"
            for name, r in refs.items()))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Plots


def pyplot():
    """matplotlib writing files only (imported here: the trainer renders text and needs none of it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs, path):
    names = [(key, label) for key, label in CURVES if any(key in m for run in runs for m in run["metrics"])]
    names += [(key, key) for key in sorted({k for run in runs for m in run["metrics"] for k in m
                                            if k.startswith("disc/") and not k.startswith("disc/pos")})]
    if not names:
        return False
    fig, axes = pyplot().subplots(len(names), 1, figsize=(7, 2.2 * len(names)), squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], names):
        for run in runs:
            points = [(m["step"], m[key]) for m in run["metrics"] if m.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=run["name"])
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    axes[0, 0].legend(fontsize=8)
    return save(fig, path)


def all_positions(masses):
    """Every position any series has, in order: a run on larger slates keeps the mass the first lacks."""
    return sorted({k for mass in masses for k in mass}, key=int)


def plot_positions(runs, path):
    """Mean predicted mass per click position (original view) against the humans' clicks and the prior."""
    scored = [(run["name"], run["eval"]["views"]["original"]["choice"]) for run in runs
              if "choice" in run["eval"].get("views", {}).get("original", {})]
    if not scored:
        return False
    human = scored[0][1]["model"]["human_positions"]
    series = [("humans", human), ("position prior", scored[0][1]["prior"]["position_mass"])]
    series += [(name, choice["model"]["position_mass"]) for name, choice in scored]
    positions = all_positions(mass for _, mass in series)
    width = 0.8 / len(series)
    fig, ax = pyplot().subplots(figsize=(7, 3))
    for i, (label, mass) in enumerate(series):
        ax.bar([p + i * width for p in range(len(positions))], [mass.get(k, 0) for k in positions], width,
               label=label)
    ax.set_xticks([p + 0.4 - width / 2 for p in range(len(positions))], positions)
    ax.set_xlabel("click position")
    ax.set_ylabel("share")
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_calibration(runs, path):
    scored = [(run["name"], run["eval"]["views"]["original"]["choice"]["calibration"]) for run in runs
              if "choice" in run["eval"].get("views", {}).get("original", {})]
    if not scored:
        return False
    fig, ax = pyplot().subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    for name, cells in scored:
        cells = [c for c in cells if c["n"]]
        ax.plot([c["predicted"] for c in cells], [c["observed"] for c in cells], marker="o", label=name)
    ax.set_xlabel("predicted probability of an option")
    ax.set_ylabel("how often it was the click")
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_opinion(runs, path):
    """The share of each direction (humans, prior, every run) and the opinion's calibration."""
    scored = [(run["name"], run["eval"]["views"]["original"]["opinion"]) for run in runs
              if run["eval"].get("views", {}).get("original", {}).get("opinion")]
    if not scored:
        return False
    fig, (bars, curve) = pyplot().subplots(1, 2, figsize=(9, 3.5))
    first = scored[0][1]
    series = [("humans", first["model"]["human_shares"]), ("direction prior", first["prior"]["shares"])]
    series += [(name, opinion["model"]["shares"]) for name, opinion in scored]
    labels, width = list(first["model"]["shares"]), 0.8 / len(series)
    for i, (name, shares) in enumerate(series):
        bars.bar([p + i * width for p in range(len(labels))], [shares[k] for k in labels], width, label=name)
    bars.set_xticks([p + 0.4 - width / 2 for p in range(len(labels))], labels)
    bars.set_ylabel("share of rows")
    bars.legend(fontsize=7)
    curve.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    for name, opinion in scored:
        cells = [c for c in opinion["calibration"] if c["n"]]
        curve.plot([c["predicted"] for c in cells], [c["observed"] for c in cells], marker="o", label=name)
    curve.set_xlabel("predicted probability of a direction")
    curve.set_ylabel("how often it was the shift")
    curve.legend(fontsize=7)
    return save(fig, path)


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# The report


CONFIG_KEYS = ("eval_only", "model_name_or_path", "dataset", "prompt_mode", "max_steps", "prompts_per_step",
               "num_generations", "max_completion_length", "learning_rate", "beta", "loss_type", "scale_rewards",
               "reward_funcs", "reward_weights", "gail_use", "shuffle_slates", "grail_max_history",
               "viewpoint_in_question", "seed", "split_seed")


def config_section(runs):
    keys = [k for k in CONFIG_KEYS if any(run["config"].get(k) not in (None, "") for run in runs)]  # set somewhere
    rows = [[f"`{k}`"] + [f"`{run['config'].get(k, '')}`" for run in runs] for k in keys]
    rows.append(["world size / devices"] + [f"{run['environment'].get('world_size', '?')} / "
                                            f"{', '.join(sorted(set(run['environment'].get('devices', []))))}"
                                            for run in runs])
    rows.append(["git commit"] + [f"`{run['environment'].get('git_commit', '?')[:10]}`" for run in runs])
    return "## Configuration\n\n" + table(["key"] + [run["name"] for run in runs], rows)


def plots_section(runs, out_dir):
    plots = [("curves.png", "training curves", plot_curves), ("positions.png", "click positions", plot_positions),
             ("calibration.png", "calibration", plot_calibration), ("opinion.png", "opinion shift", plot_opinion)]
    shown = [f"![{label}]({name})" for name, label, plot in plots if plot(runs, out_dir / name)]
    return "## Plots\n\n" + ("\n\n".join(shown) if shown else "(nothing to plot)")


def eval_section(run):
    ev = run["eval"]
    if not ev:
        return (f"## Evaluation: {run['name']}\n\n(none: this run evaluated nothing; train with `eval_on_end=true`, "
                "or run `--eval_only` on its checkpoint)")
    parts = [f"## Evaluation: {run['name']} (step {ev.get('step')}, {ev.get('n_total')} {ev.get('split', '')} rows)",
             eval_summary(ev)]
    if run["evals"] and len(run["evals"]) > 1:
        first = run["evals"][0]
        rows = [[view, with_ci(first["views"][view]), with_ci(ev["views"][view])]
                for view in ev.get("views", {}) if view in first.get("views", {})]
        parts.append("### Accuracy before and after training\n\n" + table(
            ["view", f"step {first.get('step')}", f"step {ev.get('step')}"], rows))
    return "\n\n".join(parts)


def comparison_section(runs):
    rows = []
    for run in runs:
        ev = run["eval"]
        views = ev.get("views", {})
        choice = views.get("original", {}).get("choice")
        model = choice["model"] if choice else {}
        opinion = views.get("original", {}).get("opinion")
        rows.append([run["name"], ev.get("step")] + [num(model.get(k)) for k, _ in SCORES]
                    + [num((ev.get("untrained") or {}).get("model", {}).get("logloss")),
                       num(choice["prior"]["logloss"]) if choice else "", num(choice["uniform"]["logloss"]) if choice else "",
                       with_ci(views["original"]) if "original" in views else "",
                       ("yes" if choice["collapse"]["flag"] else "no") if choice else "",
                       num(opinion["model"]["logloss"]) if opinion else "", num(opinion["prior"]["logloss"]) if opinion else ""])
    header = ["run", "step", *(label for _, label in SCORES), "untrained log-loss", "prior log-loss",
              "uniform log-loss", "accuracy (original)", "collapse", "opinion log-loss", "opinion prior log-loss"]
    return "## Runs side by side\n\n" + table(header, rows)


def disc_section(run, last=10):
    """What a GAIL user reads: D's accuracy on held-out humans against fresh policy samples over the
    run, and per displayed position the humans' click share, the policy's and the mean D over the
    last steps, so "D has fallen behind" and "D rewards the mode" show in one table."""
    metrics = [m for m in run["metrics"] if "disc/loss" in m]
    if not metrics:
        return ""
    steps = [m for m in metrics if m.get("disc/heldout_acc") is not None]
    picks = [steps[i] for i in sorted({0, len(steps) // 2, len(steps) - 1})] if steps else []  # first, middle, last
    parts = [f"## Discriminator: {run['name']}"]
    if picks:
        rows = [[m["step"], num(m["disc/heldout_acc"]), num(m["disc/heldout_acc_human"]),
                 num(m["disc/fresh_acc_policy"]), num(m.get("disc/mean_d_policy"))]
                for m in picks]
        parts.append("Accuracy on held-out humans' clicks (validation participants) against this step's fresh "
                     "policy choices, before D trains on them (0.5: D cannot tell them apart):\n\n" + table(
                         ["step", "balanced accuracy", "humans called human", "policy called policy",
                          "mean D of the policy's choices"], rows))
    tail = metrics[-last:]
    positions = sorted({int(k.split("/")[1][3:]) for m in tail for k in m if k.startswith("disc/pos")})

    shown = [m for m in tail if any(k.startswith("disc/pos") for k in m)]

    def mean(key, absent=None):  # a share is 0 in a step whose slates had no such position; D is not
        values = [m.get(key, absent) for m in shown]
        values = [v for v in values if v is not None]
        return num(sum(values) / len(values)) if values else ""

    rows = [[k, mean(f"disc/pos{k}/human_share", 0.0), mean(f"disc/pos{k}/policy_share", 0.0),
             mean(f"disc/pos{k}/mean_d")] for k in positions]
    parts.append(f"By displayed position, mean over the last {len(tail)} steps (human share: the clicks of the "
                 "step's prompts; policy share: its valid choices; mean D: over every shown option there):\n\n"
                 + table(["position", "human share", "policy share", "mean D"], rows))
    return "\n\n".join(parts)


def samples_section(run, limit=6):
    rows = [[c.get("step"), c.get("gold"), f"`{json.dumps(c.get('completion'))[:120]}`", c.get("reward")]
            for c in run["completions"][-limit:]]
    return f"## Sample completions: {run['name']}\n\n" + (table(["step", "gold", "completion", "reward"], rows)
                                                           if rows else "(none recorded)")


def write_report(run_dirs, out=None):
    runs = [RunFolder(d).read() for d in run_dirs]
    out_dir = Path(out) if out else Path("reports") / (
        runs[0]["name"] if len(runs) == 1 else "compare-" + "-".join(run["name"] for run in runs))
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [f"# GRAIL report: {', '.join(run['name'] for run in runs)}"]
    if len(runs) > 1:
        sections.append(comparison_section(runs))
    sections += [eval_section(run) for run in runs]
    sections += [part for part in (disc_section(run) for run in runs) if part]
    sections.append(plots_section(runs, out_dir))
    sections.append(config_section(runs))
    sections += [samples_section(run) for run in runs]
    path = out_dir / "README.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path


def main(argv):
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), None)
    run_dirs = [a for a in argv if not a.startswith("--")]
    if not run_dirs:
        raise SystemExit("usage: python reports.py RUN_DIR [RUN_DIR ...] [--out=DIR]")
    print(f"[report] {write_report(run_dirs, out)}")


if __name__ == "__main__":
    errors.run(main, sys.argv[1:])
