"""Rank 1 raises while rank 0 waits in a collective; run by test_faults.py under torchrun."""
import torch

import distributed

world = distributed.setup(timeout_minutes=5)
if world.rank == 1:
    raise RuntimeError("injected failure on rank 1")
distributed.all_reduce_sum(torch.ones(1))  # rank 0 would wait here for ever without the launcher
