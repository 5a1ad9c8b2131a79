"""What autograd saves for backward, per MMDiT block: `measure_saved_bytes(model, forward)`, shared by the
activation planner's tests (tests/test_activation_plan.py, one process) and the sequence-parallel worker
(tests/dist/model_tp_worker.py)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

OUTSIDE = "outside"


@dataclass
class SavedBytes:
    """Bytes of the storages autograd saved, per block index and OUTSIDE, with each storage's shapes (debug)."""
    per_block: dict = field(default_factory=lambda: defaultdict(int))
    outside: int = 0
    shapes: dict = field(default_factory=lambda: defaultdict(list))


def measure_saved_bytes(model: torch.nn.Module, forward) -> SavedBytes:
    """Run `forward()` (the model's forward and the loss) recording every tensor autograd saves. Each storage
    counts once, by its data pointer (a saved view keeps its whole storage); parameters are not activations.
    A storage belongs to the block during whose forward it was first saved - a full-recompute checkpoint saves
    its inputs right after its blocks run, so they count for its last block - except the tensors every block
    is handed (temb, RoPE tables): those are counted once, outside."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shared: set = set()
    seen: set = set()
    # Held until the end, so that no address is reused: what a dead branch saved (the last block's text stream
    # after its attention; the model's output does not depend on it) is freed when forward returns, and the
    # loss's tensors could otherwise land on an address already counted.
    alive: list = []
    out = SavedBytes()
    phase = [OUTSIDE]

    def enter_block(i):
        def hook(_module, args):
            phase[0] = i
            shared.update(a.untyped_storage().data_ptr() for a in args[2:] if isinstance(a, torch.Tensor))
        return hook

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in params or key in seen or storage.nbytes() == 0:
            return t
        seen.add(key)
        alive.append(storage)
        where = OUTSIDE if key in shared else phase[0]
        if where == OUTSIDE:
            out.outside += storage.nbytes()
        else:
            out.per_block[where] += storage.nbytes()
        out.shapes[where].append((tuple(t.shape), str(t.dtype).replace("torch.", ""), storage.nbytes()))
        return t

    handles = [layer.register_forward_pre_hook(enter_block(i)) for i, layer in enumerate(model.layers)]
    handles.append(model.norm_out.register_forward_pre_hook(lambda *_: phase.__setitem__(0, OUTSIDE)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for h in handles:
            h.remove()
    return out
