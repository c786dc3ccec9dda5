"""The run folder's writers: one process per folder (an OS lock), and write failures (a full disk)
that lose nothing: one [output] line, the previous checkpoint intact, no half-written file a reader
would trust, and a resume that continues bitwise like an uninterrupted run."""
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import distributed
import outputs
import train_grail as tg
from errors import UserError
from outputs import RunFolder
from test_train import small_cfg

ROOT = Path(__file__).resolve().parent.parent
CPU = distributed.single_process()
HOLD = ("import sys, time; sys.path.insert(0, sys.argv[1]); from outputs import RunFolder; "
        "RunFolder(sys.argv[2]).lock(); print('locked', flush=True); time.sleep(600)")


def env():
    out = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out.pop("GAIL_USE", None)
    return out


def hold_lock(folder):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(ROOT), str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def train_command(model_dir, out_dir, launcher=(sys.executable,)):
    return [*launcher, "train_grail.py", f"--model_name_or_path={model_dir}", f"--output_dir={out_dir}",
            "--prompt_mode=answer", "--max_steps=2", "--prompts_per_step=2", "--num_generations=3",
            "--max_completion_length=6", "--save_steps=2", "--eval_on_end=true", "--eval_max_rows=2"]


def test_a_second_process_is_refused_and_a_killed_holders_lock_is_free_at_once(tiny_model_dir, tmp_path):
    folder = tmp_path / "run"
    holder = hold_lock(folder)
    try:
        before = sorted(p.name for p in folder.iterdir())
        result = subprocess.run(train_command(tiny_model_dir, folder), cwd=ROOT, env=env(), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"[output] {folder} is being written by pid {holder.pid} on ")
        assert " since " in lines[0] and sorted(p.name for p in folder.iterdir()) == before == [".lock"]
    finally:
        holder.kill()  # SIGKILL: no handler runs, the kernel drops the lock
        holder.wait()
    t0 = time.time()
    taker = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(ROOT), str(folder)],
                           capture_output=True, text=True, timeout=60)
    assert taker.stdout.strip() == "locked" and time.time() - t0 < 30


def test_a_waiting_process_says_how_long_it_waited(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        t0 = time.time()
        with pytest.raises(UserError, match=r"\(waited 2 s\)"):
            RunFolder(tmp_path).lock(wait_seconds=2)
        assert time.time() - t0 >= 2
    finally:
        holder.kill()
        holder.wait()


def test_two_trainers_started_together_one_trains(tiny_model_dir, tmp_path):
    procs = [subprocess.Popen(train_command(tiny_model_dir, tmp_path), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code == 0 for code, _ in results) == [False, True]
    refused = next(err for code, err in results if code != 0).strip().splitlines()
    assert len(refused) == 1 and "is being written by pid" in refused[0]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # one writer's steps, once each


def test_torchrun_ranks_all_stop_on_a_held_folder(tiny_model_dir, tmp_path):
    holder = hold_lock(tmp_path)
    try:
        launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
        result = subprocess.run(train_command(tiny_model_dir, tmp_path, launcher), cwd=ROOT, env=env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        # Rank 0's line (rank 1 prints it too unless torchrun has ended it first).
        assert result.stderr.count(f"[output] {tmp_path} is being written by pid {holder.pid}") >= 1
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


# --- a full disk at every write point ---


class FullDisk:
    """Make the `nth` write of files named `name` fail with ENOSPC after writing half its bytes."""

    def __init__(self, name, nth):
        self.name, self.nth, self.seen = name, nth, 0

    def hit(self, path):
        if os.path.basename(str(path)) != self.name:
            return False
        self.seen += 1
        return self.seen == self.nth

    def half_then_fail(self, path, data):
        with open(path, "ab") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def inject(monkeypatch, disk):
    import transformers.modeling_utils

    real_open, real_save, real_safetensors = open, torch.save, transformers.modeling_utils.safe_save_file

    class Failing:
        def __init__(self, f, path):
            self.f, self.path = f, path

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Failing(f, path) if ("a" in mode or "w" in mode) and disk.hit(path) else f

    def fake_save(obj, path, *args, **kwargs):
        if disk.hit(path):
            disk.half_then_fail(path, b"x" * 4096)
        return real_save(obj, path, *args, **kwargs)

    def fake_safetensors(tensors, path, *args, **kwargs):
        if disk.hit(path):
            disk.half_then_fail(path, b"x" * 4096)
        return real_safetensors(tensors, path, *args, **kwargs)

    monkeypatch.setattr(outputs, "open", fake_open, raising=False)
    monkeypatch.setattr(torch, "save", fake_save)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fake_safetensors)


def config(model_dir, out_dir):
    return small_cfg(model_dir, out_dir, max_steps=4, save_steps=2, eval_samples=0, eval_on_start=False)


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    tg.train(config(tiny_model_dir, out), CPU)
    return load_file(out / "checkpoint-000004" / "model.safetensors")


# (file, which write of it fails): a step's metrics line, its completions, the final evaluation,
# the second checkpoint's weights, its optimizer state, the trainer state JSON.
WRITE_POINTS = [("metrics.jsonl", 3), ("completions.jsonl", 3), ("eval.json.tmp", 1), ("model.safetensors", 2),
                ("optimizer.pt", 2), ("trainer_state.json.tmp", 2)]


@pytest.mark.parametrize("name, nth", WRITE_POINTS)
def test_a_full_disk_loses_nothing_and_the_run_resumes_bitwise(tiny_model_dir, tmp_path, monkeypatch, straight,
                                                               name, nth):
    with monkeypatch.context() as patch:
        inject(patch, FullDisk(name, nth))
        with pytest.raises(UserError) as failed:
            tg.train(config(tiny_model_dir, tmp_path), CPU)
    message = str(failed.value)
    assert message.startswith("[output] cannot write ") and "No space left on device" in message
    assert "\n" not in message and " free there" in message
    assert not list(tmp_path.glob("checkpoint-*.tmp*")) and not list(tmp_path.rglob("*.json.tmp"))
    for jsonl in tmp_path.glob("*.jsonl"):  # whole lines only
        [json.loads(line) for line in jsonl.read_text().splitlines()]
    newest = RunFolder(tmp_path).checkpoints()[-1]
    assert checkpoint.checkpoint_problem(newest) is None
    tg.train(config(tiny_model_dir, tmp_path), CPU)  # the restart resumes from the newest complete checkpoint
    resumed = load_file(tmp_path / "checkpoint-000004" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and json.loads((tmp_path / "eval.json").read_text())["step"] == 4


def test_the_refusal_names_a_holder_that_writes_itself_in_a_moment_late(tmp_path):
    import threading

    from outputs import lock_holder

    lock_file = tmp_path / ".lock"
    lock_file.write_text("")
    with open(lock_file, "a+", encoding="utf-8") as reader:
        assert lock_holder(reader, tries=2) == "another process"  # nobody ever writes: said so, not hung
        late = threading.Timer(0.2, lambda: lock_file.write_text("pid 7 on node\n"))
        late.start()  # the holder took the lock and writes its name 0.2 s later (a slow machine)
        assert lock_holder(reader) == "pid 7 on node"
        late.join()


# --- folders that are not (whole) runs ---


def test_a_model_folder_is_refused_as_output_dir_and_its_config_kept(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    before = (folder / "config.json").read_bytes()
    with pytest.raises(UserError) as refused:
        tg.train(small_cfg(tiny_model_dir, folder, max_steps=1, save_steps=1, eval_on_start=False), CPU)
    assert str(refused.value).startswith(f"[output] {folder} holds a config.json that is not a grail run's ")
    assert "\n" not in str(refused.value) and (folder / "config.json").read_bytes() == before
    assert not (folder / "metrics.jsonl").exists() and not list(folder.glob("checkpoint-*"))


def test_a_torn_last_line_is_dropped_and_rewritten_and_a_bad_middle_line_is_named(tmp_path, capsys):
    run = RunFolder(tmp_path)
    outputs.append_jsonl(run.metrics, [{"step": 1, "x": "caf\u00e9 \u2028 \x85"}, {"step": 2}])
    whole = run.metrics.read_bytes()
    with open(run.metrics, "ab") as f:
        f.write('{"step": 3, "x": "caf\u00e9'.encode()[:-1])  # cut inside a UTF-8 character
    assert outputs.read_jsonl(run.metrics) == [{"step": 1, "x": "caf\u00e9 \u2028 \x85"}, {"step": 2}]
    assert capsys.readouterr().out == f"[output] {run.metrics}: dropped its torn last line 3 (a write cut short)\n"
    run.forget_steps_after(2)  # a resume: the next append must not join the torn line
    assert run.metrics.read_bytes() == whole
    run.metrics.write_bytes(whole[:-1])  # cut just before the last newline: the object is whole, kept
    run.forget_steps_after(2)
    assert run.metrics.read_bytes() == whole and outputs.read_jsonl(run.metrics)[-1] == {"step": 2}
    run.metrics.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(UserError, match=rf"^\[output\] {run.metrics} line 2 is not JSON "):
        outputs.read_jsonl(run.metrics)


def test_a_restart_after_a_torn_metrics_line_resumes(tiny_model_dir, tmp_path):
    cfg = dict(eval_on_start=False, eval_on_end=False, save_steps=1)
    tg.train(small_cfg(tiny_model_dir, tmp_path, max_steps=1, **cfg), CPU)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 0.')  # the node died mid-append of step 2
    tg.train(small_cfg(tiny_model_dir, tmp_path, max_steps=2, **cfg), CPU)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
