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
import importlib.util
import json
import os
from pathlib import Path

from errors import UserError


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


def eval_folder(model):
    """Where `--eval_only` writes by default: out/eval-<checkpoint or model name>, never a training
    run's folder."""
    path = Path(model)
    name = f"{path.parent.name}-{path.name}" if path.name.startswith("checkpoint-") else path.name
    return str(Path("out") / f"eval-{name or 'model'}")


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

    def holds_training(self):
        return self.metrics.exists() or bool(self.checkpoints())

    def check_writable(self):
        """An output_dir that is a file, or that cannot be created or written, fails here in one
        line, before anything loads."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError("output", f"output_dir {self.path} is a file, not a folder")
        probe = self.path / f".write-test-{os.getpid()}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_text("", encoding="utf-8")
            probe.unlink()
        except OSError as err:
            raise UserError("output", f"cannot write to output_dir {self.path}: {err.strerror or err}") from None

    def check_reuse(self, config, resume, may_change):
        """Refuse to mix runs: a training run continues only with the same experiment (`config`,
        except the `may_change` keys, which are returned as 'key: old -> new' lines); resume=false or
        an evaluation never write over a run that is already there."""
        if not self.config.exists() and not self.holds_training():
            return []
        old = read_json(self.config).get("config", {}) if self.config.exists() else {}
        fresh = "choose a new --output_dir, or move this one away"
        if config.get("eval_only"):
            if self.holds_training() or not old.get("eval_only"):
                raise UserError("output", f"{self.path} holds a training run; an evaluation writes to its own "
                                          f"output_dir: {fresh}")
            return []
        if not resume:
            raise UserError("output", f"{self.path} already holds a run and resume=false never overwrites it: {fresh}")
        changed = {key: (old.get(key), value) for key, value in config.items()
                   if key in old and old[key] != value}
        differences = [f"{key}: {a!r} -> {b!r}" for key, (a, b) in sorted(changed.items()) if key not in may_change]
        if differences:
            raise UserError("output", f"{self.path} holds a run of a different experiment ({'; '.join(differences)}): "
                                      f"run with its settings to continue it, {fresh}, or edit {self.config} "
                                      "to accept the change")
        return [f"{key}: {a!r} -> {b!r}" for key, (a, b) in sorted(changed.items())]

    # --- writing (rank 0) ---

    def write_config(self, config, environment, resumed_from):
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.config, {"config": config, "environment": environment,
                                 "resumed_from": str(resumed_from) if resumed_from else None})

    def forget_steps_after(self, step):
        """Drop the logged steps after `step` (a resumed run redoes them), so no step appears twice."""
        for path in (self.metrics, self.completions):
            rows = read_jsonl(path)
            if any(row.get("step", 0) > step for row in rows):
                tmp = Path(str(path) + ".tmp")
                tmp.write_text("", encoding="utf-8")
                append_jsonl(tmp, [row for row in rows if row.get("step", 0) <= step])
                os.replace(tmp, path)

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
        if not self.eval.exists() and not self.metrics.exists():
            raise UserError("report", f"{self.path}: no eval.json and no metrics.jsonl, not a run folder")
        config = read_json(self.config) if self.config.exists() else {}
        return {"name": self.name, "dir": self.path, "config": config.get("config", {}),
                "environment": config.get("environment", {}), "metrics": read_jsonl(self.metrics),
                "eval": read_json(self.eval) if self.eval.exists() else {}, "evals": [read_json(p) for p in sorted(self.evals.glob("step_*.json"))],
                "completions": read_jsonl(self.completions)}


class Tracker:
    """The scalars of metrics.jsonl (and the evaluations' choice_* scores), also sent to TensorBoard
    (`output_dir/tensorboard/`) and/or Weights & Biases (offline unless WANDB_MODE says otherwise),
    as TRL's `report_to`. Neither package is a requirement: asking for a missing one fails up front."""

    def __init__(self, kinds, run, config):
        missing = [kind for kind in kinds if importlib.util.find_spec(kind) is None]
        if missing:
            raise UserError("config", f"report_to={kinds} needs {' and '.join(missing)}: pip install {' '.join(missing)}")
        self.writers = {}
        if "tensorboard" in kinds:
            from torch.utils.tensorboard import SummaryWriter

            self.writers["tensorboard"] = SummaryWriter(str(run.path / "tensorboard"))
        if "wandb" in kinds:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")  # clusters often have no route out
            self.writers["wandb"] = wandb.init(project="grail", name=run.name, dir=str(run.path), config=config,
                                               resume="allow", id=run.name)

    def log(self, metrics, step):
        scalars = {key: value for key, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}
        if "tensorboard" in self.writers:
            for key, value in scalars.items():
                self.writers["tensorboard"].add_scalar(key, value, step)
            self.writers["tensorboard"].flush()
        if "wandb" in self.writers:
            self.writers["wandb"].log(scalars, step=step)

    def close(self):
        if "tensorboard" in self.writers:
            self.writers["tensorboard"].close()
        if "wandb" in self.writers:
            self.writers["wandb"].finish()
