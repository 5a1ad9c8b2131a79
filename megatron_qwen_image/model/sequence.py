"""Token-sequence helpers for megatron's sequence parallelism (SP) in the MMDiT.

Inside the blocks both residual streams are sequence-first, `[s, b, h]`, as in megatron's own models,
because megatron's Column/RowParallelLinear all-gather / reduce-scatter along dim 0. With SP each TP rank
holds a contiguous 1/TP of each stream's tokens: the embeddings' outputs are padded to a multiple of TP and
scattered (`enter_sequence_parallel`), the final image stream is gathered and unpadded
(`leave_sequence_parallel`). The pad tokens never reach the loss or the attention (attention.py slices them
off after the q/k/v projection), so their gradients are exactly zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region


def padded_length(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (the TP size)."""
    return -(-n // multiple) * multiple


def pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """x [s, ...] padded with zero tokens at the end of dim 0 up to `length` (x itself when s == length)."""
    extra = length - x.shape[0]
    if extra == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, extra))


def enter_sequence_parallel(x: torch.Tensor, tp: int) -> torch.Tensor:
    """A stream [s, b, h], whole on every TP rank, -> this rank's shard [ceil(s / tp), b, h] (padded).
    Backward all-gathers, so replicated layers before it get the full gradient on every rank."""
    return scatter_to_sequence_parallel_region(pad_tokens(x, padded_length(x.shape[0], tp)))


def leave_sequence_parallel(x: torch.Tensor, length: int) -> torch.Tensor:
    """This rank's shard -> the whole stream [length, b, h] on every TP rank (pad dropped). Every rank then
    computes the same loss, so backward hands each rank its own slice of the (identical) gradient."""
    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)[:length]
