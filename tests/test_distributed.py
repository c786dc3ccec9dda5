"""Two gloo processes on the CPU must train exactly like one process on the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def run(args, nproc=None, **kwargs):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1")
    launcher = [sys.executable] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def weights(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("loss_type, accumulation, shared, fsdp", [
    ("dapo", 1, "1", "0"), ("grpo", 2, "1", "0"), ("dr_grpo", 1, "0", "0"), ("dapo", 2, "1", "1")])
def test_two_ranks_equal_one_rank_on_the_same_global_batch(tiny_model_dir, tmp_path, loss_type, accumulation,
                                                           shared, fsdp):
    worker = str(ROOT / "tests" / "ddp_worker.py")
    two = run([worker, str(tiny_model_dir), str(tmp_path / "two"), loss_type, str(accumulation), shared, fsdp],
              nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run([worker, str(tiny_model_dir), str(tmp_path / "one"), loss_type, "1", shared, "0"])
    assert one.returncode == 0, one.stderr[-3000:]
    rank0, single = weights(tmp_path / "two.rank0.pt"), weights(tmp_path / "one.rank0.pt")
    rank1 = rank0 if fsdp == "1" else weights(tmp_path / "two.rank1.pt")  # FSDP2: one gathered copy
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    change = max((single[key] - initial[key]).abs().max().item() for key in initial)
    assert change > 1e-4  # the updates did something, so agreeing below is not vacuous
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ on {key}"
        assert torch.allclose(rank0[key], single[key], atol=1e-5, rtol=0), \
            f"{key}: 2 ranks vs 1 rank differ by {(rank0[key] - single[key]).abs().max():.2e}"
