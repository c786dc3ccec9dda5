"""How ranks cooperate: the process group, the collectives the trainer needs, DDP/FSDP2 wrapping of
the policy, and the one precision every forward runs in.

One process (`python train_grail.py`) is a world of size 1: every collective here is then a no-op,
so the same code runs with and without torchrun.
"""
import gc
import os
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from errors import UserError


@dataclass
class World:
    """This process's place among the ranks, and its device."""
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    def print(self, *args):
        """Rank 0 alone prints."""
        if self.is_main:
            print(*args, flush=True)


def single_process(device="cpu"):
    return World(0, 1, 0, torch.device(device))


STOP_REQUESTED = threading.Event()  # set by SIGTERM / SIGUSR1 (train_grail.main)


def stop_requested(world, stop_file=""):
    """Has any rank been asked to stop (a signal, or `stop_file` appearing)? One all-reduce: every
    rank must call it at the same point, and they all get the same answer."""
    local = STOP_REQUESTED.is_set() or bool(stop_file and Path(stop_file).exists())
    return all_reduce_sum(torch.tensor(float(local), device=world.device)).item() > 0


def on_main(world, action):
    """Run `action` on rank 0 alone; the one-line error it raises (errors.UserError) ends every rank
    with that line, the other ranks learning it from rank 0."""
    error = None
    if world.is_main:
        try:
            action()
        except UserError as err:
            error = err
    problem = all_gather_list([str(error) if error else None])[0]
    if error:
        raise error
    if problem:
        raise SystemExit(problem)


class Preempted(Exception):
    """A stop was requested (signal or stop file); every rank stopped at the same point, after writing
    the checkpoint of step `args[0]` where a step has run."""


def preempted(step, message, stop_file, world):
    """Say where the run stopped and consume the stop file (a restart must not stop again)."""
    world.print(message)
    if world.is_main and stop_file:
        Path(stop_file).unlink(missing_ok=True)
    return Preempted(step)


def setup(timeout_minutes):
    """torchrun's environment -> a process group (NCCL on CUDA, gloo on CPU); plain `python` -> one process."""
    if "RANK" not in os.environ:
        return single_process("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown(wait_for_peers):
    """Destroy the process group. After a clean finish every rank waits for the others first: a rank
    that tears gloo down while a peer is still busy (rank 0 saving, say) can abort at exit with
    "terminate called without an active exception". After an error a peer may never arrive, so
    there is no barrier then. Modules that hold the group (a DDP wrapper in a reference cycle) are
    collected first, so gloo's threads are joined now rather than during interpreter teardown."""
    if not dist.is_initialized():
        return
    gc.collect()
    if wait_for_peers:
        dist.barrier()
    dist.destroy_process_group()


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_list(items):
    """Concatenation of every rank's list, in rank order."""
    if not dist.is_initialized():
        return list(items)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def uses_autocast(device, cuda, cpu=False):
    return (device.type == "cuda" and cuda) or (device.type == "cpu" and cpu)


def autocast(device, cuda, cpu=False):
    """bf16 autocast for generation, every log-prob pass of training (policy, old policy, reference)
    and the evaluation: on CUDA when `cuda` (cfg.bf16), on CPU when `cpu` (cfg.cpu_bf16). One
    precision throughout, or precision alone would move the importance ratio away from 1."""
    if uses_autocast(device, cuda, cpu):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------------------------------------
# The policy across ranks


def wrap(policy, model, fsdp, world):
    """`policy` (a module around `model`) for the update: DDP over replicated weights, or FSDP2
    sharding each decoder layer and the root (parameters become DTensors, so the optimizer is built
    after this)."""
    if not dist.is_initialized():
        return policy
    if not fsdp:
        ids = [world.local_rank] if world.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(policy, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return policy


def unwrap(module):
    """The module under a DDP (or similar) wrapper."""
    return module.module if hasattr(module, "module") else module


def fsdp_modules(model):
    if not dist.is_initialized():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_params(model):
    """Under FSDP2, gather every shard for the duration (generation, no-grad passes): each rank then
    runs its own forwards with no collectives, so ranks may decode different numbers of tokens."""
    sharded = fsdp_modules(model)
    for module in sharded:
        module.unshard()
        module.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()
            module.set_reshard_after_forward(True)


def gradient_sync(policy, model, enabled):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
    if enabled:
        return nullcontext()
    if hasattr(policy, "no_sync"):  # DDP
        return policy.no_sync()
    sharded = fsdp_modules(model)
    return _fsdp_no_sync(sharded) if sharded else nullcontext()


@contextmanager
def _fsdp_no_sync(sharded):
    for module in sharded:
        module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for module in sharded:
            module.set_requires_gradient_sync(True)
