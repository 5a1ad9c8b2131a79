"""Activation memory per GPU: what autograd keeps from the forward for the backward, term by term.

`activation_plan(cfg, height, width, micro_batch, text_len, ...)` counts, op by op through the block
(megatron_qwen_image/model/block.py, attention.py, layers.py, rope.py and megatron-core's Column/RowParallelLinear
and MLP), every tensor autograd saves, each storage once (a saved view keeps its whole storage alive, so the q/k
views RMSNorm saves keep the whole fused q/k/v output). Parameters are not activations and are not counted.
tests/test_activation_plan.py measures the same thing with torch.autograd.graph.saved_tensors_hooks on a tiny
model and checks every formula against it.

Per token of either stream (a = activation bytes: 2 in bf16, 4 in fp32; h hidden, f MLP width, H heads, TP = t;
the image and the text stream run the same ops, so one term covers both):
  pre-norms (x2: attention half, MLP half)  LayerNorm input = the residual stream (h·a), its mean + rstd
                                            (2 fp32), its output, saved by the x·(1 + scale) multiply (h·a)
  linears' inputs                           q/k/v and MLP fc1 save the modulated input (h·a each); the out
                                            projection and fc2 save theirs (h/t·a, f/t·a); GELU saves fc1's
                                            output (f/t·a)
  q/k/v output                              3h/t·a, kept whole by the q and k views RMSNorm saves
  q/k RMSNorm                               rsqrt (H/t fp32 each), the normalised q, k (saved by the weight
                                            multiply, h/t·a each) and, in bf16 only, the fp32 upcasts that
                                            pow(2) saves (h/t·4 each; in fp32 `.to(float32)` is the tensor
                                            itself). RoPE saves only its cos/sin tables (shared by all blocks:
                                            counted outside), since those need no gradient
  attention (joint [image, text])           flash / cuDNN / memory-efficient kernels (GPU, and torch's CPU flash
                                            kernel): q, k, v (3h/t·a), the output (h/t·a), the log-sum-exp
                                            (H/t fp32); the math kernel: scaled q, k and a copy of v, the
                                            probabilities [B, H/t, S, S] and its output's copy. A padded
                                            batch attends per sample on its valid prefix: output, log-sum-exp
                                            (and the math kernel's terms) per valid token, plus the padded,
                                            concatenated output that the out-projections save
  gated residuals                           the gate multiplies save the attention and MLP outputs (h·a each)
Per sample and stream: the modulation's SiLU output (h), its [6h] output (kept by the gate views), the two
(1 + scale) (2h). Outside the blocks: img_in's input (the latents), txt_norm and txt_in (text features), the
timestep MLP, the RoPE tables (fp32), norm_out + proj_out on the image tokens, and the loss's fp32 difference.

Sequence parallelism (megatron's meaning, parallelism.sequence_parallel): each TP rank holds 1/t of each stream's
tokens (padded to a multiple of t) outside the TP regions. So the per-token terms that are full-width without SP
become 1/t: the residual-stream LayerNorm inputs, stats and outputs, the modulated inputs of q/k/v and fc1
(megatron's LinearWithGradAccumulationAndAsyncCommunication saves the SHARDED input and all-gathers it again in
backward), and the gated attention/MLP outputs (after the reduce-scatter). The terms inside the TP regions (q/k/v
output, RMSNorm, attention, GELU, fc2 input, out-projection input) already have h/t or f/t per token and see the
whole, gathered sequence, so they do not change (the q/k/v output and the out-projection inputs are padded to a
multiple of t). The per-sample modulation terms are whole on every rank either way. Outside the blocks SP adds
two whole-stream tensors: megatron's scatter hands each rank a view of the embedded streams, so the first block's
saved shard keeps them whole, and the all-gathers go through megatron's global buffer (kept at its largest
size). To plan an SP run: `activation_plan(cfg, h, w, b, l, sequence_parallel=True)`.

Recompute (recompute.* in the config):
  selective core_attn  drops the kernel's output and log-sum-exp (math kernel: the probabilities); the out
                       projection then saves the recomputed region's output instead
  selective layernorm  drops each pre-norm's stats, output and (1 + scale); keeps its input
  selective mlp        drops GELU's input and fc2's input
  full                 a recomputed unit (block, or chunk of blocks with 'uniform') keeps only its img and txt
                       inputs; in backward it is run again, so one unit's whole activations come back
                       (`recompute_bytes`: the peak over the backward, beyond what the forward left stored)
Not counted: the gradients of the activations during backward (a few hidden-size tensors per token), the
kernels' workspaces, the allocator's fragmentation - `recommend_recompute` keeps a reserve for them. Counted
although freed when the forward returns: the last block's text stream after its attention (the output does not
depend on it; under a quarter of one block).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from consumer.config import TrainConfig
from megatron_qwen_image.config import ConfigError
from megatron_qwen_image.model.rope import TEXT_TABLE_STEP

FLASH, MATH = "flash", "math"        # attention kernels: GPU (and torch's CPU flash) kernels, or the math one
RECOMPUTE_KEYS = ("recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules")
SELECTIVE_DEFAULT = ("core_attn",)   # megatron's default recompute_modules
FP32 = 4
# Share of the GPU's memory the recommendation leaves free: CUDA context, NCCL buffers, allocator fragmentation,
# kernels' workspaces and backward's transient activation gradients (none of which is counted above).
RESERVE_FRACTION = 0.10
# Elementwise FLOPs per element of one LayerNorm + (1 + scale) * x + shift; only to rank recompute choices
# (memory-bound on a GPU: its time is larger than these FLOPs suggest, but still small).
NORM_MODULATE_FLOPS = 8


class PlanInputError(ConfigError):
    """A planner input (a dry-run flag) is invalid. A ConfigError, so the trainer refuses it like a bad config
    key: one line (the message, which names the flag) and exit code 2."""

    def __init__(self, message: str, key: str = "dry-run"):
        self.key, self.message, self.source = key, message, None
        ValueError.__init__(self, message)


@dataclass(frozen=True)
class Term:
    """One kind of saved tensor: `count` units (tokens on this rank, samples, ...) of `elements` x `itemsize` bytes."""
    name: str
    per: str        # what one unit is: "token", "joint token", "image token", "text token", "sample", ...
    count: int
    elements: int
    itemsize: int

    @property
    def bytes(self) -> int:
        return self.count * self.elements * self.itemsize

    @property
    def bytes_per_unit(self) -> int:
        return self.elements * self.itemsize


@dataclass(frozen=True)
class Recompute:
    """megatron's recompute settings (the config's recompute.* keys), with selective's default filled in."""
    granularity: str | None = None
    method: str | None = None
    num_layers: int | None = None
    modules: tuple = ()

    @classmethod
    def from_dict(cls, d: dict) -> "Recompute":
        unknown = set(d) - set(RECOMPUTE_KEYS)
        if unknown:
            raise PlanInputError(f"recompute: unknown keys {sorted(unknown)}, expected {list(RECOMPUTE_KEYS)}")
        g = d.get("recompute_granularity")
        if g not in (None, "full", "selective"):
            raise PlanInputError(f"recompute_granularity must be null, full or selective, got {g!r}")
        modules = d.get("recompute_modules")
        if g == "selective" and modules is None:
            modules = SELECTIVE_DEFAULT
        if g == "full" and d.get("recompute_method") not in ("uniform", "block"):
            raise PlanInputError(f"recompute_method must be uniform or block with full recompute, "
                                 f"got {d.get('recompute_method')!r}")
        n = d.get("recompute_num_layers")
        if g == "full" and not (isinstance(n, int) and n >= 1):
            raise PlanInputError(f"recompute_num_layers must be >= 1 with full recompute, got {n!r}")
        return cls(g, d.get("recompute_method") if g == "full" else None,
                   d.get("recompute_num_layers") if g == "full" else None,
                   tuple(modules or ()) if g == "selective" else ())

    def as_dict(self) -> dict:
        return {"recompute_granularity": self.granularity, "recompute_method": self.method,
                "recompute_num_layers": self.num_layers,
                "recompute_modules": list(self.modules) if self.granularity == "selective" else None}

    def overrides(self) -> str:
        """As key=value overrides for the trainer's command line (YAML values: null, [a,b])."""
        def value(v):
            return "null" if v is None else f"[{','.join(v)}]" if isinstance(v, list) else str(v)
        return " ".join(f"recompute.{k}={value(v)}" for k, v in self.as_dict().items())

    def label(self) -> str:
        if self.granularity is None:
            return "none"
        if self.granularity == "selective":
            return f"selective [{', '.join(self.modules)}]"
        return f"full {self.method}, {self.num_layers} layer{'s' if self.num_layers != 1 else ''}"

    def selective(self, module: str) -> bool:
        return self.granularity == "selective" and module in self.modules


@dataclass(frozen=True)
class ActivationPlan:
    """Activation bytes per rank of one micro-batch: one block's terms, the blocks under recompute, the rest."""
    height: int
    width: int
    micro_batch: int
    text_len: int
    image_tokens: int               # per sample
    text_lengths: tuple | None      # valid caption tokens per sample; None: no padding
    num_layers: int
    tp: int
    sequence_parallel: bool
    bf16: bool
    attention_kernel: str
    recompute: Recompute
    block_terms: tuple              # what one block keeps when it is not fully recomputed
    dropped_terms: tuple            # what selective recompute drops from a block (0 bytes kept)
    checkpoint_terms: tuple         # what a fully recomputed unit keeps: its img and txt inputs
    outside_terms: tuple            # embeddings, RoPE tables, norm_out / proj_out, loss
    block_flops: float              # forward FLOPs of one block on this rank (for ranking recompute choices)
    recomputed_flops: float         # of those, what selective recompute runs again

    @property
    def per_layer_bytes(self) -> int:
        return sum(t.bytes for t in self.block_terms)

    @property
    def checkpoint_bytes(self) -> int:
        return sum(t.bytes for t in self.checkpoint_terms)

    @property
    def outside_bytes(self) -> int:
        return sum(t.bytes for t in self.outside_terms)

    def units(self) -> list[tuple[int, bool]]:
        """The blocks as (number of blocks, checkpointed) units, in forward order."""
        n, r = self.num_layers, self.recompute
        if r.granularity != "full":
            return [(n, False)]
        if r.method == "uniform":
            return [(min(r.num_layers, n - s), True) for s in range(0, n, r.num_layers)]
        k = min(r.num_layers, n)
        return [(1, True)] * k + ([(n - k, False)] if n > k else [])

    def _stored(self, unit: tuple[int, bool]) -> int:
        size, checkpointed = unit
        return self.checkpoint_bytes if checkpointed else size * self.per_layer_bytes

    @property
    def layers_bytes(self) -> int:
        """All blocks' saved activations at the end of the forward (a fully recomputed unit keeps its inputs)."""
        return sum(self._stored(u) for u in self.units())

    @property
    def recompute_bytes(self) -> int:
        """Backward's peak beyond `layers_bytes`: backward reaches unit j with units 0..j-1 still stored and
        unit j's blocks' activations present (recomputed ones reuse their saved input as the first block's)."""
        units, peak, below = self.units(), 0, 0
        for unit in units:
            peak = max(peak, below + unit[0] * self.per_layer_bytes)
            below += self._stored(unit)
        return max(0, peak - self.layers_bytes)

    @property
    def total_bytes(self) -> int:
        return self.outside_bytes + self.layers_bytes + self.recompute_bytes

    @property
    def extra_compute_fraction(self) -> float:
        """Recomputed forward FLOPs / the step's model FLOPs (3 x forward of the blocks)."""
        step = 3 * self.num_layers * self.block_flops
        r = self.recompute
        if r.granularity == "full":
            return sum(size for size, ck in self.units() if ck) * self.block_flops / step
        return self.num_layers * self.recomputed_flops / step


# ---------------------------------------------------------------------------------------------------- inputs
def parse_resolution(text: str) -> tuple[int, int]:
    """'1328' (square) or 'HxW' ('928x1664') -> (height, width) in pixels."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if not m:
        raise PlanInputError(f"--resolution {text!r}: expected pixels, e.g. 1328 or 928x1664 (height x width)")
    h = int(m.group(1))
    return h, int(m.group(2)) if m.group(2) else h


_UNITS = {"": 1e9, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str) -> int:
    """'80GB' (1e9), '80GiB' (2^30), '141G', '80' (GB) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise PlanInputError(f"--gpu-memory {text!r}: expected a size such as 80GB, 141GB or 80GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def worst_case_text_lengths(micro_batch: int, text_len: int) -> tuple | None:
    """The captions the dry run plans for: one sample is never padded; a micro-batch of several is padded to its
    longest caption, and the most memory is kept when all are (nearly) full length."""
    return None if micro_batch == 1 or text_len == 1 else tuple([text_len] * (micro_batch - 1) + [text_len - 1])


# ----------------------------------------------------------------------------------------------------- model
def activation_plan(cfg: TrainConfig, height: int, width: int, micro_batch: int, text_len: int,
                    tp: int | None = None, sequence_parallel: bool | None = None, recompute: dict | None = None,
                    bf16: bool | None = None, attention_kernel: str = FLASH,
                    text_lengths: Sequence[int] | None = None) -> ActivationPlan:
    """The activation bytes one rank keeps for a micro-batch of `micro_batch` images of height x width pixels
    with `text_len` caption tokens. Defaults come from the config: TP, parallelism.sequence_parallel,
    recompute.*, precision.bf16 (automatic: bf16, a GPU run). `attention_kernel`: FLASH (flash / cuDNN /
    memory-efficient on GPU, torch's flash kernel on CPU) or MATH. `text_lengths`: valid tokens per sample of a
    padded batch (each <= text_len; the model then attends per sample); None: no padding."""
    m = cfg.model
    factor = 8 * m.patch_size  # VAE downsampling x latent packing
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % factor:
            raise PlanInputError(f"--resolution: {name} {v} must be a positive multiple of {factor} pixels "
                                 f"(VAE factor 8 x patch size {m.patch_size})")
    if micro_batch < 1:
        raise PlanInputError(f"--micro-batch must be >= 1, got {micro_batch}")
    if text_len < 1:
        raise PlanInputError(f"--text-len must be >= 1, got {text_len}")
    if attention_kernel not in (FLASH, MATH):
        raise PlanInputError(f"attention_kernel must be {FLASH!r} or {MATH!r}, got {attention_kernel!r}")
    tp = tp or cfg.parallelism.tensor_model_parallel_size
    if sequence_parallel is None:  # the key exists once the model supports SP; False before
        sequence_parallel = bool(getattr(cfg.parallelism, "sequence_parallel", False))
    sp = bool(sequence_parallel) and tp > 1
    rc = Recompute.from_dict(recompute if recompute is not None else
                             {k: getattr(cfg.recompute, k) for k in RECOMPUTE_KEYS})
    if bf16 is None:  # the config's value, or a GPU run (bf16) when it is automatic
        bf16 = True if cfg.precision.bf16 is None else cfg.precision.bf16
    if text_lengths is not None:
        text_lengths = tuple(int(n) for n in text_lengths)
        if len(text_lengths) != micro_batch or not all(0 <= n <= text_len for n in text_lengths):
            raise PlanInputError(f"text_lengths {list(text_lengths)}: one length in [0, {text_len}] per sample")
        if all(n == text_len for n in text_lengths):
            text_lengths = None  # nothing padded: one unmasked attention, as the model does

    h, heads, n_layers = m.hidden_size, m.num_attention_heads, m.num_layers
    f = m.ffn_hidden_size or 4 * h
    if heads % tp or f % tp:
        raise PlanInputError(f"TP={tp} must divide num_attention_heads={heads} and ffn_hidden_size={f}")
    a = 2 if bf16 else FP32
    hr, fr, head_r = h // tp, f // tp, heads // tp      # per TP rank
    B, N, L = micro_batch, (height // factor) * (width // factor), text_len

    def pad(n):  # SP pads each stream to a multiple of TP
        return -(-n // tp) * tp if sp else n

    tokens_full = B * (pad(N) + pad(L))                 # whole (gathered) sequences, SP-padded
    tokens_rank = tokens_full // tp if sp else tokens_full  # what this rank holds outside the TP regions
    joint = B * (N + L)                                 # attention's tokens (pads dropped after q/k/v)
    valid = [N + n for n in text_lengths] if text_lengths else [N + L] * B
    valid_tokens, valid_pairs = sum(valid), sum(n * n for n in valid)
    padded = text_lengths is not None

    def T(name, per, count, elements, itemsize=a):
        return Term(name, per, count, elements, itemsize)

    kept, dropped = [], []

    def add(term, drop=False):
        (dropped if drop else kept).append(term)

    # --- modulation (img_mod / txt_mod), per sample and stream; SiLU's input temb is shared (outside)
    add(T("modulation: SiLU output (the linear's input)", "sample x stream", 2 * B, h))
    add(T("modulation: output [6 x hidden], kept by the gate views", "sample x stream", 2 * B, 6 * h))
    add(T("modulation: (1 + scale) of both pre-norms", "sample x stream", 2 * B, 2 * h),
        drop=rc.selective("layernorm"))
    # --- the two pre-norms (attention half, MLP half) of each stream
    for half in ("attention", "MLP"):
        add(T(f"{half} pre-norm: LayerNorm input (the residual stream)", "token", tokens_rank, h))
        add(T(f"{half} pre-norm: LayerNorm mean + rstd (fp32)", "token", tokens_rank, 2, FP32),
            drop=rc.selective("layernorm"))
        add(T(f"{half} pre-norm: LayerNorm output (saved by x (1 + scale))", "token", tokens_rank, h),
            drop=rc.selective("layernorm"))
    # --- attention
    add(T("q/k/v linear input (modulated; SP: the shard)", "token", tokens_rank, h))
    add(T("q/k/v linear output, kept whole by the q, k views", "token (gathered)", tokens_full, 3 * hr))
    if bf16:  # in fp32 `.to(float32)` returns the tensor itself: already counted as the q/k/v output
        add(T("q, k RMSNorm: fp32 upcast saved by pow(2)", "joint token", joint, 2 * hr, FP32))
    add(T("q, k RMSNorm: rsqrt (fp32)", "joint token", joint, 2 * head_r, FP32))
    add(T("q, k RMSNorm: normalised, saved by the weight multiply", "joint token", joint, 2 * hr))
    core = rc.selective("core_attn")
    if attention_kernel == FLASH or core:  # recompute's checkpoint saves the joint q, k, v it is given
        add(T("attention: joint q, k, v", "joint token", joint, 3 * hr))
    else:  # the math kernel saves scaled q, k and a contiguous v, per attended token
        add(T("attention (math): scaled q, k and a copy of v", "valid joint token", valid_tokens, 3 * hr))
    if attention_kernel == FLASH:
        add(T("attention: output (saved by the kernel)", "valid joint token", valid_tokens, hr), drop=core)
        add(T("attention: log-sum-exp (fp32)", "valid joint token", valid_tokens, head_r, FP32), drop=core)
    else:
        add(T("attention (math): probabilities [B, H, S, S]", "valid query x key", valid_pairs, head_r), drop=core)
    # The out-projections save their input: a view of the kernel's saved output when one flash call covers
    # the batch; otherwise its own tensor (math: a layout copy; padded: the per-sample outputs concatenated;
    # core_attn recompute: the recomputed region's output).
    if attention_kernel == MATH or core or padded:
        add(T("out-projection input", "joint token", joint, hr))
    if sp:  # streams whose length is not a multiple of TP get an F.pad copy for the reduce-scatter
        padded_streams = B * ((pad(N) if N % tp else 0) + (pad(L) if L % tp else 0))
        if padded_streams:
            add(T("out-projection input: SP pad copy", "token (gathered)", padded_streams, hr))
    add(T("attention output after the out-projection (saved by the gate)", "token", tokens_rank, h))
    # --- MLP
    add(T("MLP fc1 input (modulated; SP: the shard)", "token", tokens_rank, h))
    add(T("MLP GELU input (fc1 output + bias)", "token (gathered)", tokens_full, fr), drop=rc.selective("mlp"))
    add(T("MLP fc2 input (GELU output)", "token (gathered)", tokens_full, fr), drop=rc.selective("mlp"))
    add(T("MLP output (saved by the gate)", "token", tokens_rank, h))

    checkpoint = [T("full recompute: the unit's img and txt inputs", "token", tokens_rank, h)]

    c_in, c_out, D = m.in_channels, m.patch_size ** 2 * m.out_channels, h // heads
    outside = [
        T("img_in input (packed latents)", "image token", B * N, c_in),
        T("txt_norm: normalised, saved by its weight multiply", "text token", B * L, m.joint_attention_dim),
        T("txt_in input", "text token", B * L, m.joint_attention_dim),
        T("timestep MLP: inputs of linear_1, SiLU, linear_2 and temb", "sample", B, 256 + 3 * h),
        # the text tables are cached for a multiple of TEXT_TABLE_STEP positions (rope.QwenMSRoPE) and sliced
        T("MSRoPE cos/sin tables (fp32, shared by blocks and samples)", "token of one sample",
          N + -(-L // TEXT_TABLE_STEP) * TEXT_TABLE_STEP, D, FP32),
        T("norm_out: SiLU output and (1 + scale)", "sample", B, 2 * h),
        T("norm_out: LayerNorm input (last block's image stream)", "image token", B * pad(N), h),
        T("norm_out: LayerNorm mean + rstd (fp32)", "image token", B * N, 2, FP32),
        T("norm_out: LayerNorm output and proj_out input", "image token", B * N, 2 * h),
        T("loss: prediction - target (fp32, saved by pow)", "image token", B * N, c_out, FP32),
    ]
    if sp:
        # megatron's scatter returns a contiguous slice, i.e. a view: the first block's saved shard keeps the
        # whole embedded (padded) streams alive; the shard itself is counted in the block.
        outside.append(T("SP: rest of the embedded streams, kept by the first block's shard views", "token",
                         tokens_full - tokens_rank, h))
        # The column-parallel linears all-gather into megatron's global memory buffer, kept at its largest size.
        outside.append(T("SP: megatron's all-gather buffer (the largest gathered stream)", "token (gathered)",
                         B * max(pad(N), pad(L)), h))

    # FLOPs on this rank: linears 2 x (q/k/v 3h + out h + MLP 2f) x h per token; attention 4 x h per query-key
    # pair; modulation per sample; pre-norms elementwise.
    linear = 2 * (4 * h + 2 * f) * hr * (B * (N + L))
    attention = 4 * hr * valid_pairs
    modulation = 2 * 2 * h * (6 * h // tp) * B
    norms = NORM_MODULATE_FLOPS * 2 * h * B * (N + L) // (tp if sp else 1)  # two pre-norms per token
    mlp = 2 * 2 * h * fr * B * (N + L)
    recomputed = (attention if core else 0) + (norms if rc.selective("layernorm") else 0) + \
        (mlp if rc.selective("mlp") else 0)

    return ActivationPlan(
        height=height, width=width, micro_batch=B, text_len=L, image_tokens=N, text_lengths=text_lengths,
        num_layers=n_layers, tp=tp, sequence_parallel=sp, bf16=bf16, attention_kernel=attention_kernel,
        recompute=rc, block_terms=tuple(kept), dropped_terms=tuple(dropped), checkpoint_terms=tuple(checkpoint),
        outside_terms=tuple(outside), block_flops=float(linear + attention + modulation + norms),
        recomputed_flops=float(recomputed))


# ------------------------------------------------------------------------------------------- recommendation
@dataclass(frozen=True)
class Candidate:
    plan: ActivationPlan
    total_per_gpu: float   # static (params + grads + optimizer) + activations
    fits: bool


@dataclass(frozen=True)
class Recommendation:
    gpu_bytes: int
    usable_bytes: float
    static_bytes: float
    candidates: tuple          # the choices, cheapest first, as tried
    chosen: Candidate | None   # the cheapest that fits; None: nothing fits

    @property
    def recompute(self) -> Recompute | None:
        return self.chosen.plan.recompute if self.chosen else None


def recompute_choices(num_layers: int) -> list[Recompute]:
    """Every setting the recommendation considers: none, the selective combinations, full 'block' with
    k = 1 .. n-1 recomputed blocks, full 'uniform' 1 (every block: the most memory saved)."""
    sel = [("core_attn",), ("layernorm",), ("core_attn", "layernorm"), ("layernorm", "mlp"),
           ("core_attn", "layernorm", "mlp")]
    return ([Recompute()] + [Recompute("selective", modules=s) for s in sel]
            + [Recompute("full", "block", k) for k in range(1, num_layers)] + [Recompute("full", "uniform", 1)])


def recommend_recompute(cfg: TrainConfig, height: int, width: int, micro_batch: int, text_len: int,
                        gpu_bytes: int, static_bytes: float, tp: int | None = None,
                        sequence_parallel: bool | None = None, bf16: bool | None = None,
                        attention_kernel: str = FLASH, text_lengths: Sequence[int] | None = None,
                        reserve_fraction: float = RESERVE_FRACTION) -> Recommendation:
    """The cheapest recompute setting (least recomputed FLOPs; ties: the order of `recompute_choices`) whose
    activations plus `static_bytes` (params + grads + optimizer, consumer.planner.MemoryPlan.total_bytes) fit
    in gpu_bytes minus the reserve. Of full 'block' only the smallest fitting k is kept in `candidates`."""
    usable = gpu_bytes * (1 - reserve_fraction)
    plans = [activation_plan(cfg, height, width, micro_batch, text_len, tp=tp, sequence_parallel=sequence_parallel,
                             recompute=r.as_dict(), bf16=bf16, attention_kernel=attention_kernel,
                             text_lengths=text_lengths)
             for r in recompute_choices(cfg.model.num_layers)]
    cands = [Candidate(p, static_bytes + p.total_bytes, static_bytes + p.total_bytes <= usable) for p in plans]
    order = sorted(range(len(cands)), key=lambda i: (cands[i].plan.extra_compute_fraction, i))
    chosen = next((cands[i] for i in order if cands[i].fits), None)
    # Show every non-'block' choice, and of 'block' the smallest k that fits (or the largest k when none does).
    blocks = [c for c in cands if c.plan.recompute.method == "block"]
    block = next((c for c in blocks if c.fits), blocks[-1] if blocks else None)
    shown = [cands[i] for i in order if cands[i].plan.recompute.method != "block" or cands[i] is block]
    return Recommendation(gpu_bytes, usable, static_bytes, tuple(shown), chosen)


# ---------------------------------------------------------------------------------------------------- format
def human(b: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= size:
            return f"{b / size:,.2f} {unit}"
    return f"{b:,.0f} B"


def describe(p: ActivationPlan) -> str:
    shape = (f"{p.height}x{p.width} px = {p.image_tokens:,} image + {p.text_len:,} text tokens per sample, "
             f"micro-batch {p.micro_batch}")
    pad = (f" (padded batch: captions of {', '.join(map(str, p.text_lengths))} tokens)" if p.text_lengths else "")
    kernel = "flash/cuDNN/efficient SDPA kernels" if p.attention_kernel == FLASH else "the SDPA math kernel"
    return (f"{shape}{pad}; TP {p.tp}, {'sequence parallel' if p.sequence_parallel else 'no sequence parallelism'}, "
            f"{'bf16' if p.bf16 else 'fp32'} activations, {kernel}")


def format_block_terms(p: ActivationPlan) -> str:
    """One block's saved tensors, term by term (dropped by selective recompute: marked)."""
    lines = ["| one MMDiT block keeps | per | count | bytes each | bytes |", "|---|---|---:|---:|---:|"]
    for t in p.block_terms:
        lines.append(f"| {t.name} | {t.per} | {t.count:,} | {t.bytes_per_unit:,} | {human(t.bytes)} |")
    for t in p.dropped_terms:
        lines.append(f"| ~~{t.name}~~ (recomputed) | {t.per} | {t.count:,} | {t.bytes_per_unit:,} | 0 |")
    lines.append(f"| **one block** | | | | **{human(p.per_layer_bytes)}** |")
    return "\n".join(lines)


def format_activation_plan(p: ActivationPlan, static_bytes: float | None = None) -> str:
    """The activation summary; with `static_bytes` (params + grads + optimizer) also the total per GPU."""
    units = p.units()
    n_ck = sum(1 for _, ck in units if ck)
    n_whole = sum(size for size, ck in units if not ck)
    how = {0: f"{p.num_layers} blocks x {human(p.per_layer_bytes)}"}.get(
        n_ck, f"{n_ck} recomputed unit{'s' if n_ck != 1 else ''} x {human(p.checkpoint_bytes)} (inputs only)"
        + (f" + {n_whole} blocks x {human(p.per_layer_bytes)}" if n_whole else ""))
    rows = [
        ("one MMDiT block (what it keeps when not fully recomputed)", p.per_layer_bytes),
        (f"all {p.num_layers} blocks, recompute {p.recompute.label()}: {how}", p.layers_bytes),
        ("recompute in backward: one unit's activations again", p.recompute_bytes),
        ("outside the blocks: embeddings, RoPE tables, norm_out/proj_out, loss", p.outside_bytes),
        ("activations total", p.total_bytes),
    ]
    if static_bytes is not None:
        rows.append(("total per GPU (params + grads + optimizer + activations)", static_bytes + p.total_bytes))
    lines = [f"Activations: {describe(p)}", "", "| per rank | bytes | |", "|---|---:|---:|"]
    lines += [f"| {name} | {b:,.0f} | {human(b)} |" for name, b in rows]
    return "\n".join(lines)


def _percent(x: float) -> str:
    return "< 0.1%" if 0 < x < 0.001 else f"{x:.1%}"


def format_recommendation(r: Recommendation) -> str:
    lines = [f"Recompute for {human(r.gpu_bytes)} per GPU: {human(r.usable_bytes)} usable "
             f"({RESERVE_FRACTION:.0%} kept free for the CUDA context, NCCL buffers, fragmentation and backward's "
             f"activation gradients), {human(r.static_bytes)} of it params + grads + optimizer", "",
             "| recompute | activations | total per GPU | extra compute | fits |", "|---|---:|---:|---:|---|"]
    for c in r.candidates:
        lines.append(f"| {c.plan.recompute.label()} | {human(c.plan.total_bytes)} | {human(c.total_per_gpu)} | "
                     f"{_percent(c.plan.extra_compute_fraction)} | {'yes' if c.fits else 'no'} |")
    lines.append("")
    if r.chosen:
        c = r.chosen
        lines.append(f"recommended: {c.plan.recompute.label()} ({human(c.total_per_gpu)} per GPU, "
                     f"{_percent(c.plan.extra_compute_fraction)} extra compute): {c.plan.recompute.overrides()}")
    else:
        worst = min(r.candidates, key=lambda c: c.total_per_gpu)
        lines.append(f"recommended: nothing fits - even {worst.plan.recompute.label()} needs "
                     f"{human(worst.total_per_gpu)}; use sequence parallelism, a larger TP, a smaller micro-batch "
                     f"or more DP ranks (the distributed optimizer's share shrinks)")
    return "\n".join(lines)
