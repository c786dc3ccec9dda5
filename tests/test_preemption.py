"""A stop request (SIGTERM/SIGUSR1 or the stop file) ends the step, checkpoints, exits 99; the restart
resumes and ends bitwise where an uninterrupted run ends."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def args(model_dir, out_dir):
    return [sys.executable, "train_grail.py", f"--model_name_or_path={model_dir}", f"--output_dir={out_dir}",
            "--prompt_mode=answer", "--max_steps=6", "--prompts_per_step=2", "--num_generations=3",
            "--max_completion_length=6", "--eval_max_rows=4", "--eval_samples=0", "--save_steps=100",
            "--learning_rate=1e-3"]


def env(**extra):
    out = dict(os.environ, OMP_NUM_THREADS="1")
    out.pop("GAIL_USE", None)
    out.update(extra)
    return out


def start_and_interrupt(cmd, out_dir, environment, interrupt):
    """Start the trainer; once it has logged two steps, interrupt it; return (exit code, stdout)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    metrics = Path(out_dir) / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            interrupt(proc)
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=240)
    return proc.returncode, stdout + stderr


def same_tensors(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("how, gail", [("stop_file", "0"), ("sigterm", "0"), ("sigusr1", "1")])
def test_stop_checkpoints_and_the_restart_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, how, gail):
    gail_env = {"GAIL_USE": gail, "GAIL_WARMUP_STEPS": "1", "GAIL_DISC_BATCH": "8"}
    straight = tmp_path / "straight"
    done = subprocess.run(args(tiny_model_dir, straight), cwd=ROOT, env=env(**gail_env), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    out = tmp_path / "interrupted"
    stop_file = tmp_path / "STOP"
    signals = {"sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1}
    interrupt = (lambda proc: stop_file.touch()) if how == "stop_file" else \
        (lambda proc: proc.send_signal(signals[how]))
    rc, log = start_and_interrupt(args(tiny_model_dir, out), out, env(GRAIL_STOP_FILE=str(stop_file), **gail_env),
                                  interrupt)
    assert rc == 99, log[-2000:]
    assert "[stop] requested" in log and not stop_file.exists()  # consumed
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1 and 2 <= int(saved[0].name.split("-")[1]) < 6

    resumed = subprocess.run(args(tiny_model_dir, out), cwd=ROOT, env=env(GRAIL_STOP_FILE=str(stop_file), **gail_env),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final_a, final_b = straight / "checkpoint-000006", out / "checkpoint-000006"
    a, b = load_file(final_a / "model.safetensors"), load_file(final_b / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert same_tensors(torch.load(final_a / "optimizer.pt", weights_only=True),
                        torch.load(final_b / "optimizer.pt", weights_only=True))
    if gail == "1":
        assert same_tensors(torch.load(final_a / "disc.pt", weights_only=True),
                            torch.load(final_b / "disc.pt", weights_only=True))
        assert (final_a / "disc_rank0.json").read_text() == (final_b / "disc_rank0.json").read_text()
