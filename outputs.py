"""The run folder: every file a training run or an evaluation writes, its name and what it holds.
The trainer writes through `RunFolder` and reports.py reads through it, so the schema lives here only.

    config.json             {"config": the effective Config, "environment": versions, commit, devices,
                             "resumed_from": checkpoint or null}
    metrics.jsonl           one object per optimizer step (grpo.step_metrics, disc.step_metrics)
    cloning.jsonl           one object per step of the cloning warm start: bc_step, loss (cross-entropy per
                            row, nats), lr, grad_norm (grpo.behaviour_cloning); rewritten by a restart
    completions.jsonl       sample completions with their rewards, every `log_completions_steps`
    eval.json               the latest evaluation (evaluate.evaluate's dict plus step, seconds, model, ...)
    evals/step_NNNNNN.json  every evaluation, by step
    eval_predictions.jsonl  the latest evaluation's greedy answer per row (original view)
    checkpoint-NNNNNN/      a checkpoint (its contents: checkpoint.py); `.tmp-<pid>` while being written
    .lock                   held (an OS lock) by the one process writing the folder; says who: host, pid, since

Every JSON file is written to a `.tmp` sibling and renamed, so a reader never sees half a file; an
append that fails (a full disk, a quota, a read-only remount) is cut back to the last whole line.
Either way the failure is one `[output]` line naming the file, the bytes it needed and the bytes free.
"""
import errno
import fcntl
import importlib.util
import json
import os
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from errors import UserError

HELD_LOCKS = {}  # run folder -> the open .lock file this process holds its lock through
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)  # a file system without flock


def write_failure(path, err, needed_bytes):
    """The one line of a write that failed: which file, why, what it needed and what is free there."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    return UserError("output", f"cannot write {path}: {err.strerror or err} (it needed {megabytes(needed_bytes)}, "
                               f"{megabytes(free)} free there); files written before are intact and a restart "
                               "resumes from the newest complete checkpoint")


def megabytes(n):
    return f"{n / 1e6:.1f} MB"


def jsonl_text(objects):
    return "".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj in objects)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def write_text(path, text):
    """`text` into `path` through a `.tmp` sibling and a rename: the old file or the new, never half."""
    tmp = Path(str(path) + ".tmp")
    data = text.encode("utf-8")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, err, len(data)) from None


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path):
    return parse_jsonl(path)[0]


def parse_jsonl(path):
    """The objects of a JSONL file and whether its last line is unfinished (torn, or whole without its
    newline). A node that dies mid-append (or an NFS client that loses its tail) leaves a partial last
    line: it is dropped, said so, and a resume rewrites the file without it. A bad line anywhere else
    is damage, not a crash: one line."""
    path = Path(path)
    if not path.exists():
        return [], False
    # Bytes: a cut can split a UTF-8 character, and str.splitlines would also split at U+2028 or U+0085,
    # which json.dumps(ensure_ascii=False) leaves raw inside strings.
    data = path.read_bytes()
    lines = [(n, line) for n, line in enumerate(data.splitlines(), 1) if line.strip()]
    rows = []
    for n, line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:  # not JSON, or not UTF-8
            if n != lines[-1][0]:
                raise UserError("output", f"{path} line {n} is not JSON (a damaged file): fix or remove that "
                                          "line") from None
            print(f"[output] {path}: dropped its torn last line {n} (a write cut short)", flush=True)
            return rows, True
    # Cut just before its newline, the last object is whole, but an append would join it: rewrite too.
    return rows, bool(data.strip()) and not data.endswith(b"\n")


def append_jsonl(path, objects):
    """Whole lines or nothing: an append that fails is cut back to where the file ended."""
    data = jsonl_text(objects).encode("utf-8")
    try:
        with open(path, "ab") as f:
            end = f.tell()
            try:
                f.write(data)
                f.flush()
            except OSError:
                f.truncate(end)
                raise
    except OSError as err:
        raise write_failure(path, err, len(data)) from None


def eval_folder(model):
    """Where `--eval_only` writes by default: out/eval-<checkpoint or model name>, never a training
    run's folder."""
    path = Path(model)
    name = f"{path.parent.name}-{path.name}" if path.name.startswith("checkpoint-") else path.name
    return str(Path("out") / f"eval-{name or 'model'}")


def lock_holder(handle, tries=20):
    """Who holds the lock, as it wrote itself into the lock file ("pid N on host"). The holder writes
    right after it takes the lock, so a process that finds the lock taken may read the file in
    between: poll briefly (a slow or loaded machine widens that gap) before saying "another process"."""
    for _ in range(tries):
        handle.seek(0)
        holder = handle.read().strip()
        if holder:
            return holder
        time.sleep(0.05)
    return "another process"


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.completions = self.path / "completions.jsonl"
        self.cloning = self.path / "cloning.jsonl"
        self.eval = self.path / "eval.json"
        self.evals = self.path / "evals"
        self.predictions = self.path / "eval_predictions.jsonl"
        self.lock_file = self.path / ".lock"

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
                 if p.is_dir() and ".tmp" not in p.name and (p / "trainer_state.json").exists()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def holds_training(self):
        return self.metrics.exists() or bool(self.checkpoints())

    def lock(self, wait_seconds=0):
        """Become the one process that writes this folder: an exclusive OS lock on `.lock`, held
        until this process ends, however it ends (SIGKILL too: the kernel drops it, so no stale
        lock needs a human). While another process holds it, wait up to `wait_seconds`, then fail in
        one line naming the holder. Nothing is written into the folder unless the lock is ours. This
        process asking again (a second `train` call in one Python session) finds it held already."""
        key = str(self.path.resolve())
        if key in HELD_LOCKS:
            return
        self.check_folder()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.lock_file, "a+", encoding="utf-8")
        except OSError as err:
            raise UserError("output", f"cannot write to output_dir {self.path}: {err.strerror or err}") from None
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = lock_holder(handle)
                    handle.close()
                    waited = f" (waited {wait_seconds} s)" if wait_seconds else ""
                    raise UserError("output", f"{self.path} is being written by {holder}{waited}: one process per "
                                              "run folder; wait for it, stop it, or choose another --output_dir") from None
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            except OSError as err:
                if err.errno not in NO_LOCKS:
                    raise
                print(f"[output] {self.path}: this file system has no file locks ({err.strerror}): nothing stops a "
                      "second process from writing the same folder", flush=True)
                break
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}\n")
        handle.flush()
        HELD_LOCKS[key] = handle  # the lock lives as long as this open file: the process
        for stale in self.path.glob("checkpoint-*.tmp*"):  # saves of writers that died; none runs now
            shutil.rmtree(stale, ignore_errors=True)

    def check_folder(self):
        if self.path.exists() and not self.path.is_dir():
            raise UserError("output", f"output_dir {self.path} is a file, not a folder")

    def check_writable(self):
        """An output_dir that is a file, or that cannot be created or written, fails here in one
        line, before anything loads."""
        self.check_folder()
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
        fresh = "choose a new --output_dir, or move this one away"
        old = self.run_config(fresh) if self.config.exists() else {}
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

    def run_config(self, fresh):
        """The Config of the run in this folder. A config.json of another kind (a model's
        `save_pretrained` folder) is refused: resuming would overwrite it with this run's."""
        try:
            written = read_json(self.config)
        except OSError as err:
            raise UserError("output", f"cannot read {self.config}: {err.strerror or err}") from None
        except ValueError:  # not JSON: this trainer writes its config.json whole (write_json)
            written = None
        if not isinstance(written, dict) or not isinstance(written.get("config"), dict):
            raise UserError("output", f"{self.path} holds a config.json that is not a grail run's (a model "
                                      f"folder?), and a run would overwrite it: {fresh}")
        return written["config"]

    # --- writing (rank 0) ---

    def write_config(self, config, environment, resumed_from):
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.config, {"config": config, "environment": environment,
                                 "resumed_from": str(resumed_from) if resumed_from else None})

    def forget_steps_after(self, step):
        """Drop the logged steps after `step` (a resumed run redoes them), so no step appears twice."""
        for path in (self.metrics, self.completions):
            rows, torn = parse_jsonl(path)
            if torn or any(row.get("step", 0) > step for row in rows):  # torn: the next append would join it
                write_text(path, jsonl_text(row for row in rows if row.get("step", 0) <= step))

    def write_cloning(self, steps):
        write_text(self.cloning, jsonl_text(steps))  # whole: a restart clones again from the start

    def append_step(self, metrics, completions=()):
        append_jsonl(self.metrics, [metrics])
        if completions:
            append_jsonl(self.completions, completions)

    def write_eval(self, metrics, predictions, alone=False):
        """`alone`: an --eval_only folder holds one evaluation, so an earlier one (another checkpoint's
        step) is not shown as this one's "before"."""
        self.evals.mkdir(parents=True, exist_ok=True)
        for old in self.evals.glob("step_*.json") if alone else ():
            old.unlink()
        write_json(self.eval_at(metrics["step"]), metrics)
        write_json(self.eval, metrics)
        write_text(self.predictions, jsonl_text(predictions))

    # --- reading (reports.py) ---

    def read(self):
        """Everything a report shows: config, environment, step metrics, evaluations, completions."""
        if not self.eval.exists() and not self.metrics.exists():
            raise UserError("report", f"{self.path}: no eval.json and no metrics.jsonl, not a run folder")
        config = read_json(self.config) if self.config.exists() else {}
        return {"name": self.name, "dir": self.path, "config": config.get("config", {}),
                "environment": config.get("environment", {}), "metrics": read_jsonl(self.metrics),
                "eval": read_json(self.eval) if self.eval.exists() else {},
                "evals": [read_json(p) for p in sorted(self.evals.glob("step_*.json"))],
                "completions": read_jsonl(self.completions)}


def check_reporters(kinds):
    """report_to's packages are optional: one that is missing is refused before a run folder is made."""
    missing = [kind for kind in kinds if importlib.util.find_spec(kind) is None]
    if missing:
        raise UserError("config", f"report_to={kinds} needs {' and '.join(missing)}: pip install {' '.join(missing)}")


class Tracker:
    """The scalars of metrics.jsonl (and the evaluations' choice_* scores), also sent to TensorBoard
    (`output_dir/tensorboard/`) and/or Weights & Biases (offline unless WANDB_MODE says otherwise),
    as TRL's `report_to`. Neither package is a requirement: asking for a missing one fails up front."""

    def __init__(self, kinds, run, config):
        check_reporters(kinds)
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
