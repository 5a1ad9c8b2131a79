"""Workarounds for megatron-core 0.16.1 that are not CPU emulation: every one of them lives here, under
the same version pin as megatron_qwen_image.cpu_emulation, so that moving to another megatron-core
release means reading one file.

* `quiet_known_warnings()`: the known, harmless warnings megatron-core 0.16.1 and torch 2.13 print at import
  and on every step (the trainer's start-up banner states the facts that matter instead).
"""
from __future__ import annotations

import warnings

import torch

from megatron_qwen_image.cpu_emulation import PINNED_MEGATRON_CORE

__all__ = ["PINNED_MEGATRON_CORE", "quiet_known_warnings"]

_KNOWN_WARNINGS = (
    ("Transformer Engine and Apex are not installed", UserWarning),      # -> torch AdamW, local multi-tensor ops
    ("full scope is deprecated", UserWarning),                           # TransformerConfig's own default
    ("The .grad attribute of a Tensor that is not a leaf", UserWarning),  # DistributedOptimizer's zero_grad on views
    (r"`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning),
    ("`load_state_dict` is deprecated", FutureWarning),                  # torch_dist's loader, on every load
)


def quiet_known_warnings() -> None:
    """Filter the warnings above (idempotent). Called before megatron-core is first imported."""
    for pattern, category in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    if not torch.cuda.is_available():  # only meaningful for CUDA streams
        warnings.filterwarnings("ignore", message="When using async grad allreduce", category=UserWarning)
