"""`--dry-run` parallelism planner: parameters and bytes per rank for a config and a TP x DP layout.

Nothing is allocated and no process group is needed: the model is built once at TP=1 on PyTorch's meta
device (real module code, shapes only), and each tensor's tensor-parallel split axis comes from the model's
weight mapping (megatron_qwen_image.model.diffusers_mapping: column-parallel q/k/v, MLP fc1, img/txt_mod
and norm_out are split along dim 0, row-parallel out-projections / fc2 along dim 1, everything else is
replicated). A TP rank holds numel / TP of each split tensor and all of each replicated one.

Accounting per rank, matching megatron-core's DistributedDataParallel + DistributedOptimizer:
  params     bf16 (2 B) on a GPU run, fp32 (4 B) on a CPU run; the full TP shard on every DP rank
  grads      fp32 (4 B): DDP's contiguous main_grad buffer (grad_reduce_in_fp32), full size on every DP
             rank (reduce-scatter happens inside it)
  optimizer  Adam exp_avg + exp_avg_sq (8 B) plus, with bf16 params, the fp32 main copy (4 B);
             divided by DP with the distributed optimizer, not divided without it
Activations depend on resolution, micro-batch, recompute and sequence parallelism: consumer.activation_plan
counts them; `dry_run_activations` adds them to this plan (the dry run's --resolution etc.) and, for a GPU size,
recommends the cheapest recompute setting that fits. megatron pads each param to a 64-element boundary and each
bucket to a multiple of DP inside its buffers: a few KB, not shown.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from consumer.activation_plan import (PlanInputError, activation_plan, format_activation_plan, format_block_terms,
                                      format_recommendation, parse_bytes, parse_resolution, recommend_recompute,
                                      worst_case_text_lengths)
from consumer.config import TrainConfig
from megatron_qwen_image.cache.buckets import BASE_RESOLUTIONS, CONDITION_AREA, buckets_for_base, condition_size
from megatron_qwen_image.cache.format import VAE_SCALE_FACTOR, group_name
from megatron_qwen_image.model import QwenImageMMDiT
from megatron_qwen_image.model.diffusers_mapping import tensor_mappings_for


@dataclass(frozen=True)
class TensorSplit:
    """One parameter: its full shape and the axis tensor parallelism splits it along (None: replicated)."""
    name: str
    shape: tuple
    tp_axis: int | None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class MemoryPlan:
    """Parameters and bytes per rank of one TP x DP layout (before activations)."""
    tp: int
    dp: int
    bf16: bool
    distributed_optimizer: bool
    total_params: int
    sharded_params_per_rank: int     # this rank's pieces of TP-split tensors
    replicated_params_per_rank: int  # tensors every TP rank holds whole

    @property
    def params_per_rank(self) -> int:
        return self.sharded_params_per_rank + self.replicated_params_per_rank

    @property
    def param_bytes(self) -> int:
        return self.params_per_rank * (2 if self.bf16 else 4)

    @property
    def grad_bytes(self) -> int:
        return self.params_per_rank * 4

    @property
    def optimizer_bytes_per_param(self) -> int:
        return 12 if self.bf16 else 8

    @property
    def optimizer_bytes(self) -> float:
        full = self.params_per_rank * self.optimizer_bytes_per_param
        return full / self.dp if self.distributed_optimizer else full

    @property
    def total_bytes(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def tensor_splits(cfg: TrainConfig) -> list[TensorSplit]:
    """Every parameter's full shape (meta-device build at TP=1) with its TP split axis."""
    model_config = cfg.model_config(bf16=False, use_cpu_initialization=True, tp_size=1, perform_initialization=False)
    with torch.device("meta"):
        model = QwenImageMMDiT(model_config)
    axes = {mp.megatron: mp.tp_axis for mp in tensor_mappings_for(model_config)}
    params = dict(model.named_parameters())
    if set(params) != set(axes):
        raise RuntimeError(f"model parameters and weight mapping disagree: only in model "
                           f"{sorted(set(params) - set(axes))[:5]}, only in mapping {sorted(set(axes) - set(params))[:5]}")
    return [TensorSplit(name, tuple(p.shape), axes[name]) for name, p in params.items()]


def plan_memory(cfg: TrainConfig, dp: int, tp: int | None = None, bf16: bool | None = None) -> MemoryPlan:
    """The per-rank memory plan. bf16 defaults to the config's value, or True (a GPU run) when it is automatic."""
    tp = tp or cfg.parallelism.tensor_model_parallel_size
    sharded = replicated = total = 0
    for t in tensor_splits(cfg):
        total += t.numel
        if t.tp_axis is None:
            replicated += t.numel
        else:
            if t.shape[t.tp_axis] % tp:
                raise ValueError(f"{t.name}: dim {t.tp_axis} of {t.shape} is not divisible by TP={tp}")
            sharded += t.numel // tp
    if bf16 is None:  # the config's value, or a GPU run (bf16) when it is automatic
        bf16 = True if cfg.precision.bf16 is None else cfg.precision.bf16
    return MemoryPlan(tp=tp, dp=dp, bf16=bf16, distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
                      total_params=total, sharded_params_per_rank=sharded, replicated_params_per_rank=replicated)


def _human(b: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:,.2f} {unit}"
    return f"{b:,.0f} B"


def format_memory_plan(p: MemoryPlan, note: str = "") -> str:
    opt_what = "fp32 main params + Adam m, v" if p.bf16 else "Adam m, v (the fp32 params are the main params)"
    opt_div = f"/ DP {p.dp} (distributed optimizer)" if p.distributed_optimizer else "(not sharded over DP)"
    rows = [
        ("parameters: TP-sharded part", f"{p.sharded_params_per_rank:,}", "", "", ""),
        ("parameters: replicated part", f"{p.replicated_params_per_rank:,}", "", "", ""),
        (f"params ({'bf16' if p.bf16 else 'fp32'})", f"{p.params_per_rank:,}", "2" if p.bf16 else "4",
         f"{p.param_bytes:,}", _human(p.param_bytes)),
        ("grads (fp32 main_grad buffer)", f"{p.params_per_rank:,}", "4", f"{p.grad_bytes:,}", _human(p.grad_bytes)),
        (f"optimizer: {opt_what} {opt_div}", f"{p.params_per_rank:,}",
         f"{p.optimizer_bytes_per_param}" + (f"/{p.dp}" if p.distributed_optimizer else ""),
         f"{p.optimizer_bytes:,.0f}", _human(p.optimizer_bytes)),
        ("total before activations", "", "", f"{p.total_bytes:,.0f}", _human(p.total_bytes)),
    ]
    head = (f"Qwen-Image MMDiT, {p.total_params:,} parameters ({p.total_params / 1e9:.2f} B): "
            f"TP {p.tp} x DP {p.dp} = {p.tp * p.dp} ranks, {'bf16' if p.bf16 else 'fp32'} params, fp32 grads"
            + (f"\n{note}" if note else ""))
    lines = [head, "", "| per rank | elements | bytes/element | bytes | |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(lines)


DEFAULT_TEXT_LEN = 1024  # the most caption tokens Qwen-Image takes (Qwen2.5-VL features)


def dry_run_activations(cfg: TrainConfig, memory: MemoryPlan, resolution: str | None, micro_batch: int | None = None,
                        text_len: int | None = None, gpu_memory: str | None = None) -> str:
    """The dry run's activation part for `memory`'s layout: one block's terms, the summary with the total per GPU
    and, with `gpu_memory` ('80GB'), the recompute recommendation. Raises PlanInputError for a bad flag."""
    if resolution is None:
        if gpu_memory is not None or micro_batch is not None or text_len is not None:
            raise PlanInputError("--micro-batch, --text-len and --gpu-memory need --resolution (the image size "
                                 "in pixels, e.g. 1328 or 928x1664)", key="--resolution")
        return "(activations: add --resolution PIXELS, e.g. --resolution 1328 --gpu-memory 80GB)"
    height, width = parse_resolution(resolution)
    micro_batch = cfg.train.micro_batch_size if micro_batch is None else micro_batch
    text_len = DEFAULT_TEXT_LEN if text_len is None else text_len
    lengths = worst_case_text_lengths(micro_batch, text_len) if micro_batch >= 1 else None
    kw = dict(tp=memory.tp, bf16=memory.bf16, text_lengths=lengths)
    plan = activation_plan(cfg, height, width, micro_batch, text_len, **kw)
    parts = [format_activation_plan(plan, memory.total_bytes), "", format_block_terms(plan)]
    if gpu_memory is not None:
        rec = recommend_recompute(cfg, height, width, micro_batch, text_len, gpu_bytes=parse_bytes(gpu_memory),
                                  static_bytes=memory.total_bytes, **kw)
        parts += ["", format_recommendation(rec)]
    return "\n".join(parts)


def format_batch_plan(cfg: TrainConfig, dp: int) -> str:
    """With train.batching=balanced: samples per step and per micro-batch, and the planned step cost, for every
    bucket of the stage's families (data.cache.family_weights, else base_resolution, else all). Empty otherwise."""
    plan = cfg.balanced_batches(dp)
    if plan is None:
        return ""
    c = cfg.data.cache
    families = sorted(c.family_weights) if c.family_weights else [c.base_resolution] if c.base_resolution \
        else list(BASE_RESOLUTIONS)
    rows = [f"compute-balanced batches (train.batching=balanced; reference: {plan.global_batch_size} samples of "
            f"{plan.reference_resolution}x{plan.reference_resolution}, micro-batch {plan.micro_batch_size}, "
            f"{plan.text_tokens} caption tokens, DP {dp}):", "",
            "| family | bucket (w x h) | samples per step | micro-batch | accumulation | step cost vs reference |",
            "|---|---|---:|---:|---:|---:|"]
    edits = bool(c.task_weights and c.task_weights.get("ti2i", 0) > 0)
    channels = cfg.model.in_channels // cfg.model.patch_size ** 2  # the VAE's latent channels (64 packed = 16 x 2 x 2)
    for family in families:
        for bucket in buckets_for_base(family):
            for cond in ((), edit_condition_shapes(bucket, channels)) if edits else ((),):
                g, mb = plan.global_batch(bucket, cond), plan.micro_batch(bucket, cond)
                rows.append(f"| {family} | {group_name(bucket, cond)} | {g} | {mb} | {g // (mb * dp)} | "
                            f"{plan.step_cost(bucket, cond):.3f} |")
    if edits:
        rows += ["", "(+cond: an edit sample of the bucket with one source image at the edit pipeline's "
                     f"{CONDITION_AREA:,}-pixel area, the producer's default edit.condition_area; its latent C x h x w)"]
    return "\n".join(rows)


def edit_condition_shapes(bucket: tuple[int, int], channels: int) -> tuple:
    """The condition latent shapes of an edit sample of `bucket` with one source of the bucket's aspect at the
    edit pipeline's default area (what the producer writes with edit.condition_area at its default)."""
    w, h = condition_size(*bucket)
    return ((channels, h // VAE_SCALE_FACTOR, w // VAE_SCALE_FACTOR),)
