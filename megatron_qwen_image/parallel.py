"""Process-group and RNG set-up shared by training, tests and tools.

`init_parallel(tp, seed)` starts torch.distributed (NCCL on a GPU, gloo on CPU; from torchrun's
RANK/WORLD_SIZE/LOCAL_RANK, or a one-process world when launched without torchrun), initialises megatron
`parallel_state` with tensor_model_parallel_size=tp (data-parallel size = world / tp), turns on the CPU
emulation of megatron-core's hard-coded CUDA when no GPU is visible, and seeds Python, NumPy, torch and
megatron's model-parallel RNG tracker (`model_parallel_cuda_manual_seed`: the default stream gets `seed`
on every rank, the 'model-parallel-rng' stream gets seed + 2718 + tp_rank).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from . import cpu_emulation
from .config import ConfigError


@dataclass(frozen=True)
class ParallelContext:
    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device
    cpu_emulation: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_parallel(tensor_model_parallel_size: int, seed: int, timeout_minutes: int = 30) -> ParallelContext:
    cuda = torch.cuda.is_available()
    emulated = cpu_emulation.apply_if_needed()
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        store = None  # env://: torchrun's rendezvous store
    else:  # launched without torchrun: a world of one process, whose store needs no port
        rank, world, local_rank = 0, 1, 0
        store = dist.HashStore()
    if world % tensor_model_parallel_size:
        raise ConfigError("parallelism.tensor_model_parallel_size",
                          f"world size {world} is not divisible by tensor_model_parallel_size={tensor_model_parallel_size}")
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(minutes=timeout_minutes))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size)
    set_seeds(seed)
    return ParallelContext(
        rank=rank, world_size=world, local_rank=local_rank,
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device, cpu_emulation=emulated,
    )


def set_seeds(seed: int) -> None:
    """Same seed on every rank (so replicated weights start equal); TP-local streams via megatron's tracker."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
