"""Markdown reports of training runs.

    python reports.py RUN_DIR [RUN_DIR ...] [--out=DIR]

One run -> reports/<run>/README.md; several -> reports/compare-<run>-<run>.../README.md with the runs
side by side (e.g. GAIL_USE=0 vs 1). Training curves are PNG plots when matplotlib is installed and
tables otherwise. Every accuracy stands next to the positional baselines measured on the same rows.
"""
import json
import sys
from pathlib import Path

from outputs import RunFolder

CURVES = [("reward/total/mean", "total reward"), ("reward/accuracy/mean", "accuracy reward"),
          ("reward/format/mean", "format reward"), ("frac_reward_zero_std", "groups with zero reward spread"),
          ("kl", "KL to reference"), ("completion_length/mean", "completion length")]


def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def with_ci(m):
    lo, hi = m.get("ci95") or (None, None)
    return pct(m["accuracy"]) + (f" [{pct(lo)}, {pct(hi)}]" if lo is not None else "")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


CONFIG_KEYS = ("model_name_or_path", "dataset", "prompt_mode", "max_steps", "prompts_per_step", "num_generations",
               "max_completion_length", "learning_rate", "beta", "loss_type", "scale_rewards", "reward_funcs",
               "reward_weights", "gail_use", "shuffle_slates", "grail_max_history", "seed")


def config_section(runs):
    keys = [k for k in CONFIG_KEYS if any(k in run["config"] for run in runs)]
    rows = [[f"`{k}`"] + [f"`{run['config'].get(k, '')}`" for run in runs] for k in keys]
    rows.append(["world size / devices"] + [f"{run['environment'].get('world_size', '?')} / "
                                            f"{', '.join(sorted(set(run['environment'].get('devices', []))))}"
                                            for run in runs])
    rows.append(["git commit"] + [f"`{run['environment'].get('git_commit', '?')[:10]}`" for run in runs])
    return "## Configuration\n\n" + table(["key"] + [run["name"] for run in runs], rows)


def curves_section(runs, out_dir):
    names = [(key, label) for key, label in CURVES if any(key in m for run in runs for m in run["metrics"])]
    names += [(key, key) for key in sorted({k for run in runs for m in run["metrics"] for k in m
                                            if k.startswith("disc/")})]
    if not names:
        return "## Training curves\n\n(no training steps recorded)"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "## Training curves\n\n(matplotlib not installed: tables)\n\n" + curve_tables(runs, names)
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], names):
        for run in runs:
            points = [(m["step"], m[key]) for m in run["metrics"] if m.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=run["name"])
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=90)
    plt.close(fig)
    return "## Training curves\n\n![training curves](curves.png)"


def curve_tables(runs, names):
    parts = []
    for run in runs:
        metrics = run["metrics"]
        stride = max(1, len(metrics) // 12)
        shown = metrics[::stride] + ([metrics[-1]] if (len(metrics) - 1) % stride else [])
        rows = [[m["step"]] + [f"{m[key]:.3f}" if isinstance(m.get(key), (int, float)) else "" for key, _ in names]
                for m in shown]
        parts.append(f"### {run['name']}\n\n" + table(["step"] + [label for _, label in names], rows))
    return "\n\n".join(parts)


def eval_summary(ev):
    """An eval dict (evaluate.evaluate) as Markdown: the model beside every baseline in each view,
    the published checkpoints on the same rows, and the simulation scores beside the marginal prior.
    The trainer prints this after every evaluation; the report shows it under the run's heading."""
    views = list(ev.get("views", {}))
    predictors = list(dict.fromkeys(name for m in ev.get("views", {}).values() for name in m["baselines"]))

    def cell(view, name):
        b = ev["views"][view]["baselines"].get(name)
        return "" if b is None else with_ci(b) if "ci95" in b else pct(b["accuracy"])

    rows = [["**model**"] + [f"**{with_ci(ev['views'][v])}**" for v in views]]
    rows += [[name] + [cell(v, name) for v in views] for name in predictors]
    rows += [["parsed / strict format"] + [f"{pct(ev['views'][v]['parsed_rate'])} / {pct(ev['views'][v]['format_rate'])}"
                                           for v in views],
             ["most common answer"] + [f"{ev['views'][v]['most_common_answer']} on "
                                       f"{pct(ev['views'][v]['most_common_answer_share'])}" for v in views]]
    parts = ["Greedy accuracy [95% CI] by view, beside the baselines on the same rows:\n\n"
             + table(["predictor"] + views, rows)]
    refs = ev.get("reference_checkpoints") or {}
    if refs:
        parts.append("Published checkpoints on the same rows (original order): " + ", ".join(
            f"{name} {with_ci(r)} (n={r['n']}, most common answer on {pct(r.get('most_common_answer_share'))})"
            for name, r in refs.items()))
    sim = ev.get("simulation")
    if sim:
        c = sim["collapse"]
        flag = (f"**Collapse:** the model answers {c['position']} in {pct(c['model_share'])} of samples; humans "
                f"chose it on {pct(c['human_share'])} of rows." if c["flag"] else "No collapse flag.")
        scores = table(["", "TVD of positions", "Brier", "log-loss"],
                       [["model", f"{sim['tvd']:.3f}", f"{sim['brier']:.3f}", f"{sim['log_loss']:.3f}"],
                        ["marginal prior (train positions)", "", f"{sim['marginal_prior']['brier']:.3f}",
                         f"{sim['marginal_prior']['log_loss']:.3f}"]])
        hist = table(["position"] + list(sim["model_position_hist"]),
                     [["model samples"] + [pct(v) for v in sim["model_position_hist"].values()],
                      ["human clicks"] + [pct(sim["human_position_hist"].get(k)) if k in sim["human_position_hist"]
                                          else "" for k in sim["model_position_hist"]]])
        parts.append(f"Simulation quality ({sim['samples_per_row']} samples per row):\n\n{scores}\n\n{flag}\n\n{hist}")
    return "\n\n".join(parts)


def eval_section(run):
    ev = run["eval"]
    parts = [f"## Evaluation: {run['name']} (step {ev.get('step')}, {ev.get('n_total')} {ev.get('split', '')} rows)",
             eval_summary(ev)]
    if run["evals"] and len(run["evals"]) > 1:
        first = run["evals"][0]
        rows = [[view, with_ci(first["views"][view]), with_ci(ev["views"][view])]
                for view in ev.get("views", {}) if view in first.get("views", {})]
        parts.append("### Before and after training\n\n" + table(
            ["view", f"step {first.get('step')}", f"step {ev.get('step')}"], rows))
    return "\n\n".join(parts)


def comparison_section(runs):
    views = sorted({view for run in runs for view in run["eval"].get("views", {})})
    rows = []
    for run in runs:
        ev = run["eval"]
        sim = ev.get("simulation") or {}
        rows.append([run["name"]] + [with_ci(ev["views"][v]) if v in ev.get("views", {}) else "" for v in views]
                    + [f"{sim['tvd']:.3f}" if sim else "", ("yes" if sim.get("collapse", {}).get("flag") else "no")
                       if sim else ""])
    return "## Runs side by side\n\n" + table(["run"] + [f"accuracy ({v})" for v in views] + ["TVD", "collapse"], rows)


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
    sections = [f"# GRAIL report: {', '.join(run['name'] for run in runs)}", config_section(runs)]
    if len(runs) > 1:
        sections.append(comparison_section(runs))
    sections.append(curves_section(runs, out_dir))
    sections += [eval_section(run) for run in runs]
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
    main(sys.argv[1:])
