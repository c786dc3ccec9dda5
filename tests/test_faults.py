"""Numeric faults, a failing rank, and kill -9 during checkpoint saves."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import distributed
import grpo
import train_grail as tg
from errors import UserError
from outputs import RunFolder
from test_distributed import ROOT, run

CPU = distributed.single_process()


def test_non_finite_advantage_skips_the_update_and_keeps_the_weights(tiny_model_dir):
    model = checkpoint.load_model(str(tiny_model_dir), CPU.device, trainable=True)
    cfg = tg.Config(num_generations=2, max_completion_length=4, learning_rate=1e-2, max_steps=5)
    optimizer, scheduler = grpo.make_optimizer(model, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"prompt_ids": torch.randint(3, 100, (2, 5)), "prompt_mask": torch.ones(2, 5, dtype=torch.long),
             "completion_ids": torch.randint(3, 100, (4, 4)), "completion_mask": torch.ones(4, 4, dtype=torch.long),
             "advantages": torch.tensor([1.0, float("nan"), -1.0, 0.5])}
    stats = grpo.update(grpo.Policy(model, True), optimizer, scheduler, batch, cfg, CPU)
    assert stats["skipped_updates"] == 1 and not math.isfinite(stats["grad_norm"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert optimizer.state == {} or all(not s for s in optimizer.state.values())  # no moments from NaN
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.0, 0.5])
    assert grpo.update(grpo.Policy(model, True), optimizer, scheduler, batch, cfg, CPU)["skipped_updates"] == 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_one_failing_rank_ends_every_rank_promptly():
    t0 = time.time()
    result = run([str(ROOT / "tests" / "fault_worker.py")], nproc=2)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr + result.stdout
    assert time.time() - t0 < 120  # no hang until the 5-minute process-group timeout


def complete(checkpoint):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    torch.load(checkpoint / "optimizer.pt", weights_only=True)
    from safetensors.torch import load_file

    load_file(checkpoint / "model.safetensors")
    return state["step"] == int(checkpoint.name.split("-")[1])


def test_kill_9_during_saves_leaves_a_complete_checkpoint_to_resume_from(tiny_model_dir, tmp_path):
    def command(max_steps):
        return [sys.executable, "train_grail.py", f"--model_name_or_path={tiny_model_dir}",
                f"--output_dir={tmp_path}", "--prompt_mode=answer", f"--max_steps={max_steps}",
                "--prompts_per_step=2", "--num_generations=2", "--max_completion_length=2", "--eval_max_rows=2",
                "--eval_samples=0", "--eval_views=original", "--save_steps=1", "--save_total_limit=2",
                "--learning_rate=1e-3"]

    cmd = command(400)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for delay in (0.37, 0.61, 0.83):  # kill at different moments of a save-every-step run
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob("checkpoint-*")):
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finished = RunFolder(tmp_path).checkpoints()
        assert finished and all(complete(c) for c in finished)
    newest = RunFolder(tmp_path).checkpoints()[-1]
    resumed = subprocess.run(command(int(newest.name.split("-")[1]) + 1), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {newest}" in resumed.stdout


def test_no_remote_code_and_safe_loads_everywhere():
    sources = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in ROOT.rglob("*.py")
               if ".venv" not in p.parts and p.name != "test_faults.py"}  # not this test's own strings
    assert {"train_grail.py", "checkpoint.py", "bench/steps.py"} <= set(sources)
    assert not any("trust_remote_code=True" in text for text in sources.values())
    for name, text in sources.items():
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{name}: {line.strip()}"


def test_a_corrupt_trainer_state_given_to_eval_only_is_named(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "checkpoint-000002")
    state = tmp_path / "checkpoint-000002" / "trainer_state.json"
    state.write_text('{"step": 2, "config": {"prompt_mode": "ans')
    with pytest.raises(UserError, match=rf"^\[checkpoint\] {state} is unreadable \("):
        tg.parse_config([f"--eval_only={state.parent}"], {})
