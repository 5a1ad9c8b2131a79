"""Every random generator's state of this rank, as checkpoint data: Python, NumPy, torch (CPU and CUDA) and
megatron's model-parallel RNG tracker.

A checkpoint holds them as Megatron-LM stores them: one ShardedObject per TP rank with the list of every DP
rank's states. consumer.checkpointing restores them only when the TP x DP layout is unchanged (other layouts
have other streams).
"""
from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject


def get_rng_state() -> dict:
    """This rank's generator states as plain Python values (bytes, not tensors: they are pickled by
    all_gather_object and torch_dist's ShardedObject files)."""

    def raw(t: torch.Tensor) -> bytes:
        return t.cpu().contiguous().numpy().tobytes()

    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].astype(np.uint32).tobytes(), *(v for v in np_state[2:])),
        "torch": raw(torch.get_rng_state()),
        "cuda": raw(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None,
        "tracker": {k: raw(v) for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }


def set_rng_state(s: dict) -> None:
    """Restore the generator states that get_rng_state() returned."""

    def tensor(b: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(b), dtype=torch.uint8)

    random.setstate(s["python"])
    kind, keys, *rest = s["numpy"]
    np.random.set_state((kind, np.frombuffer(keys, dtype=np.uint32).copy(), *rest))
    torch.set_rng_state(tensor(s["torch"]))
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(s["cuda"]))
    tensor_parallel.get_cuda_rng_tracker().set_states({k: tensor(v) for k, v in s["tracker"].items()})


def rng_sharded_object(ctx, data) -> ShardedObject:
    """One object per TP rank holding the list of every DP rank's RNG states, as Megatron-LM stores them;
    `data` is None in a load request."""
    return ShardedObject("rng_state", data, (ctx.tp_size,), (ctx.tp_rank,), replica_id=ctx.dp_rank)
