"""Two gloo processes on the CPU must train exactly like one process on the same global batch: with
plain SGD (ddp_worker.py), so that a gradient scaled wrong by the world size shows in the weights."""
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


CACHE_WORKER = """
import sys
import checkpoint, distributed, evaluate
world = distributed.setup(5)
model = checkpoint.load_model(sys.argv[1], world.device, trainable=False)
files = sys.argv[1] if world.is_main else sys.argv[1] + "-absent"  # a rank that hashed these would differ
cache = evaluate.DistributionCache(files, model, "fp32", sys.argv[2], world)
names = distributed.all_gather_list([cache.path.name])
if world.is_main:
    print("names", *names)
distributed.shutdown(wait_for_peers=True)
"""


def test_only_rank_zero_hashes_the_model_files_for_the_evaluation_cache(tiny_model_dir, tmp_path):
    worker = tmp_path / "cache_worker.py"
    worker.write_text(CACHE_WORKER)
    two = run([str(worker), str(tiny_model_dir), str(tmp_path / "evals")], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run([str(worker), str(tiny_model_dir), str(tmp_path / "evals")])
    assert one.returncode == 0, one.stderr[-3000:]
    names = [line.split()[1:] for line in two.stdout.splitlines() if line.startswith("names")][0]
    single = [line.split()[1:] for line in one.stdout.splitlines() if line.startswith("names")][0]
    assert len(names) == 2 and names[0] == names[1] == single[0]
