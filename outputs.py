"""The run folder: every file a training run or an evaluation writes, its name and what it holds.
The trainer writes through `RunFolder` and reports.py reads through it, so the schema lives here only.

    config.json             {"config": the effective Config, "environment": versions, commit, devices,
                             "resumed_from": checkpoint or null}
    metrics.jsonl           one object per optimizer step (grpo.step_metrics, disc.step_metrics)
    completions.jsonl       sample completions with their rewards, every `log_completions_steps`
    eval.json               the latest evaluation (evaluate.evaluate's dict plus step, seconds, model, ...)
    evals/step_NNNNNN.json  every evaluation, by step
    eval_predictions.jsonl  the latest evaluation's greedy answer per row (original view)
    checkpoint-NNNNNN/      a checkpoint (its contents: checkpoint.py); `.tmp` while being written

Every JSON file is written to a `.tmp` sibling and renamed, so a reader never sees half a file.
"""
import json
import os
from pathlib import Path


def write_json(path, obj):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path):
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_jsonl(path, objects):
    with open(path, "a", encoding="utf-8") as f:
        for obj in objects:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.completions = self.path / "completions.jsonl"
        self.eval = self.path / "eval.json"
        self.evals = self.path / "evals"
        self.predictions = self.path / "eval_predictions.jsonl"

    @property
    def name(self):
        return self.path.name

    def eval_at(self, step):
        return self.evals / f"step_{step:06d}.json"

    def checkpoint(self, step):
        return self.path / f"checkpoint-{step:06d}"

    def checkpoints(self):
        """Finished checkpoints, oldest first (a `.tmp` folder is an interrupted save)."""
        found = [p for p in self.path.glob("checkpoint-*")
                 if p.is_dir() and not p.name.endswith(".tmp") and (p / "trainer_state.json").exists()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    # --- writing (rank 0) ---

    def write_config(self, config, environment, resumed_from):
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.config, {"config": config, "environment": environment,
                                 "resumed_from": str(resumed_from) if resumed_from else None})

    def append_step(self, metrics, completions=()):
        append_jsonl(self.metrics, [metrics])
        if completions:
            append_jsonl(self.completions, completions)

    def write_eval(self, metrics, predictions):
        self.evals.mkdir(parents=True, exist_ok=True)
        write_json(self.eval_at(metrics["step"]), metrics)
        write_json(self.eval, metrics)
        self.predictions.write_text("", encoding="utf-8")
        append_jsonl(self.predictions, predictions)

    # --- reading (reports.py) ---

    def read(self):
        """Everything a report shows: config, environment, step metrics, evaluations, completions."""
        if not self.eval.exists():
            raise SystemExit(f"{self.path}: no eval.json, not a finished run folder")
        config = read_json(self.config) if self.config.exists() else {}
        return {"name": self.name, "dir": self.path, "config": config.get("config", {}),
                "environment": config.get("environment", {}), "metrics": read_jsonl(self.metrics),
                "eval": read_json(self.eval), "evals": [read_json(p) for p in sorted(self.evals.glob("step_*.json"))],
                "completions": read_jsonl(self.completions)}
