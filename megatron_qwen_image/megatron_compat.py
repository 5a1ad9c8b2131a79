"""Workarounds for megatron-core 0.16.1 that are not CPU emulation: every one of them lives here, under
the same version pin as megatron_qwen_image.cpu_emulation, so that moving to another megatron-core
release means reading one file.

* `quiet_known_warnings()`: the known, harmless warnings megatron-core 0.16.1 and torch 2.13 print at import
  and on every step (the trainer's start-up banner states the facts that matter instead).
* `GatherLastDim`: an all-gather over the TP group along the last dim, because megatron's
  `gather_from_tensor_model_parallel_region` allocates its buffer on the current CUDA device (the model's
  adaLN modulation uses it).
* `apply_tp_replica_rule(sharded_state_dict)`: megatron's replica ids for the TP-replicated tensors of plain
  torch modules, which `sharded_state_dict_default` gets wrong (the checkpoint save would be refused).
* `materialize_adam_state(optimizer)`: per-param Adam state before a load, which the distributed
  optimizer's `state_dict()` needs and torch's Adam creates only at its first step.
* `load_optimizer_state(optimizer, loaded)`: the distributed optimizer's load without its 'step' bugs with
  torch's Adam (KeyError on load, one step tensor shared by every param).
* `mark_gradless_params_ready(ddp_model)`: with overlap_grad_reduce, count the params that got no gradient
  (the last block's text-stream output projection and MLP: their output is discarded) as ready, without
  which megatron never reduces their bucket.
* `use_sync_free_grad_norm()`: megatron's gradient-norm call site without TE/apex uses `multi_tensor_l2_norm`,
  which keeps the norm on the device, instead of `local_multi_tensor_l2_norm`, which syncs the host once per
  gradient tensor (consumer.builders.build_optimizer applies it).

megatron-core is imported inside the functions, not here: `consumer/__init__.py` imports this module to call
`quiet_known_warnings()` BEFORE megatron-core is first imported, and importing megatron-core prints some of
the warnings it filters.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from megatron_qwen_image.cpu_emulation import PINNED_MEGATRON_CORE

__all__ = ["PINNED_MEGATRON_CORE", "GatherLastDim", "apply_tp_replica_rule", "load_optimizer_state",
           "mark_gradless_params_ready", "materialize_adam_state", "multi_tensor_l2_norm", "quiet_known_warnings",
           "use_sync_free_grad_norm"]

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


# ---------------------------------------------------------------------------------------------- model
class GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim over the TP group; backward keeps this rank's slice of the gradient.

    The gradient w.r.t. the gathered tensor is identical on every TP rank (it feeds only replicated
    computations), so the slice is the complete gradient of this rank's piece. Written here, instead of
    megatron-core's gather_from_tensor_model_parallel_region, because that one allocates its buffer on
    torch.cuda.current_device() (0.16.1), and this one must run on CPU (gloo) as well.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        pieces = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad.chunk(world, dim=-1)[rank].contiguous(), None


# ---------------------------------------------------------------------------------------------- checkpoints
def apply_tp_replica_rule(sharded_state_dict: dict) -> None:
    """Give every ShardedTensor not split over TP the replica id (pp, tp_rank, dp), in place.

    megatron-core 0.16.1's `sharded_state_dict_default` (used for plain torch modules such as our RMSNorms
    and replicated nn.Linears) gives replica_id (0, 0, dp_rank) on EVERY TP rank when `metadata` carries
    dp_cp_group but no tp_group is passed (utils.make_sharded_tensor_for_checkpoint falls back to rank 0 of
    a None group), so all TP ranks would claim the main replica and the save is refused ("Invalid access
    pattern"). Megatron's rule for a tensor not split over TP is replica_id = (pp, tp_rank, dp): apply it.
    """
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for sh in nested_values(sharded_state_dict):
        if (isinstance(sh, ShardedTensor) and all(f == 1 for f in sh.axis_fragmentations)
                and isinstance(sh.replica_id, tuple) and len(sh.replica_id) == 3):
            sh.replica_id = (sh.replica_id[0], tp_rank, sh.replica_id[2])


def materialize_adam_state(optimizer) -> None:
    """Give every param of a fresh torch Adam its state (step 0, zero moments) before a load.

    megatron-core 0.16.1's DistributedOptimizer.state_dict() (called by sharded_state_dict, also when
    loading) reads Adam's 'step' from the per-param state, which torch.optim.Adam only creates at its first
    step: without TE/Apex, loading into a fresh optimizer fails (`assert len(steps) == 1`). The values are
    placeholders; the load replaces all of them.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def load_optimizer_state(optimizer, loaded: dict) -> None:
    """optimizer.load_state_dict(loaded), working around megatron-core 0.16.1 with torch's Adam.

    DistributedOptimizer.load_state_dict first restores Adam's 'step' into every per-param state, then
    `_set_main_param_and_optimizer_states` copies every key of that state from the checkpoint's tensors,
    which never carry 'step' (skipped on purpose): KeyError('step') without TE/Apex. So the param state of
    a 'fully_reshardable' checkpoint is loaded here with the per-param 'step' entries set aside, and put
    back afterwards. Also, load_state_dict puts ONE step tensor object into every param's state; torch's
    Adam increments it in place per param, so after one step it would read step + num_params: each param
    gets its own copy.
    """
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(opts) != 1 or "param_state" not in loaded or \
            loaded.get("param_state_sharding_type") != "fully_reshardable":
        optimizer.load_state_dict(loaded)
    else:
        (dist_opt,) = opts
        loaded = dict(loaded)
        param_state = loaded.pop("param_state")
        loaded.pop("param_state_sharding_type")
        dist_opt.load_state_dict(loaded)  # param groups, step, grad scaler
        inner = dist_opt.optimizer
        steps = {p: st.pop("step") for p, st in inner.state.items() if "step" in st}
        try:
            dist_opt.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for p, step in steps.items():
                inner.state[p]["step"] = step
    for opt in opts:  # one 'step' tensor per param (see above)
        inner = getattr(opt, "optimizer", None)
        for st in (inner.state.values() if inner is not None else ()):
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()


# ---------------------------------------------------------------------------------------------- grad norm
def multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """The L2 norm over every tensor of `tensor_lists`: a float32 tensor of shape [1] on their device, and None
    (no per-tensor norms), as megatron.core.utils.local_multi_tensor_l2_norm returns; no host sync.

    megatron-core 0.16.1's version builds `torch.tensor(l2)` from the per-tensor 0-dim norms: one
    device-to-host copy (and stream sync) per gradient tensor, hundreds per step, and then puts the result
    on the literal "cuda" device. Here the per-tensor norms are stacked on the device instead and reduced
    there, in fp32: the same value for fp32 tensors (what megatron passes: the fp32 main grads); for 16-bit
    tensors a more exact one (megatron's `torch.tensor` keeps their dtype and reduces in 16 bits).
    """
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    if not tensors:  # megatron's call site never passes none; the flag buffer knows the device
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch._foreach_norm(tensors, dtype=torch.float32)  # one fused kernel per device and dtype on a GPU
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def use_sync_free_grad_norm() -> bool:
    """Point megatron's gradient-norm call site (`clip_grads.l2_norm_impl`, used by get_grad_norm_fp32) at
    `multi_tensor_l2_norm` when megatron fell back to its local implementation (no TE, no apex; the CPU
    emulation's copy of it too). With TE or apex their fused kernel stays. Idempotent; True when in use.

    Only the call site is rebound, not megatron.core.utils.local_multi_tensor_l2_norm itself, so this does not
    interfere with megatron_qwen_image.cpu_emulation, which edits that function's source."""
    from megatron.core.optimizer import clip_grads

    current = getattr(clip_grads, "l2_norm_impl", None)
    if getattr(current, "__name__", None) == "local_multi_tensor_l2_norm":
        clip_grads.l2_norm_impl = multi_tensor_l2_norm
    return clip_grads.l2_norm_impl is multi_tensor_l2_norm


# ---------------------------------------------------------------------------------------------- DDP
def mark_gradless_params_ready(ddp_model) -> None:
    """Call after the last micro-batch's backward: with overlap_grad_reduce, register every param whose
    gradient hook did not fire as ready (its gradient is zero), so that its bucket is reduced too.

    megatron-core 0.16.1's DDP dispatches a bucket's reduce(-scatter) from the gradient hooks, once every
    param of the bucket has reported a gradient in the last micro-batch; it has no notion of unused params.
    The MMDiT's last block computes a text-stream output that nothing reads (as diffusers' does), so its
    text out-projection and MLP get no gradient: the first step's bookkeeping then fails (`assert
    len(self.per_param_grad_ready_counts) == len(self.params)` in reset), and later steps would never
    dispatch that bucket. Params are visited in bucket order, the same on every rank, so the collectives
    this may dispatch are issued in the same order everywhere.
    """
    if not ddp_model.ddp_config.overlap_grad_reduce:
        return
    for group in ddp_model.bucket_groups + ddp_model.expert_parallel_bucket_groups:
        for bucket in group.buckets:
            for param in bucket.params_list:
                if param not in group.per_param_grad_ready_counts:
                    group.register_grad_ready(param, ddp_model.force_all_reduce)
