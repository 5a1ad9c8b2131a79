"""The trainer's configuration: sections per concern, with Megatron's names, on the shared config layer
(megatron_qwen_image.config: YAML with `base:`, `key=value` overrides, errors naming the full key).

    base: model/tiny.yaml
    parallelism: {tensor_model_parallel_size: 2}
    optimizer: {lr: 5.0e-3, use_distributed_optimizer: true}
    recompute: {recompute_granularity: full, recompute_method: uniform, recompute_num_layers: 1}

Sections that configure a megatron-core object take their keys, types and defaults from it: `model`,
`parallelism` and `recompute` are fields of QwenImageConfig (megatron's TransformerConfig), `optimizer`
of OptimizerConfig, `ddp` of DistributedDataParallelConfig, `data.cache` the arguments of the cache's
BucketedLoader; those objects are built from the sections (`model_config`, `optimizer_config`,
`ddp_config`), not copied field by field. docs/configuration.md lists every key (generated).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig

from consumer.start_point import start_point
from consumer.synthetic_data import SyntheticLatentBatches
from megatron_qwen_image import config as layer
from megatron_qwen_image.cache import BucketedLoader
from megatron_qwen_image.cache.batching import BalancedBatches
from megatron_qwen_image.cache.format import CacheFormatError, read_cache_file
from megatron_qwen_image.cache.holdout import check_fraction
from megatron_qwen_image.cache.categories import check_category_weights
from megatron_qwen_image.cache.loader import check_family_weights, check_task_weights
from megatron_qwen_image.cache.shard import VERIFY_MODES
from megatron_qwen_image.config import ConfigError, option, require, section
from megatron_qwen_image.encoders.local_dir import VAE, EncoderDirError, component_dir
from megatron_qwen_image.flow_matching import SigmaSampling
from megatron_qwen_image.model.backends import TRANSFORMER_IMPLS, BackendChoice, block_spec_backend
from megatron_qwen_image.model.config import ModelConfigError, QwenImageConfig
from megatron_qwen_image.model.fused import EAGER, FUSION_MODES, FusionBackend, select_fusion
from megatron_qwen_image.prompts import PromptsFileError, check_encoded, load_encoded

ModelSection = section("ModelSection", QwenImageConfig, {
    "num_layers": "dual-stream MMDiT blocks",
    "hidden_size": "width of both streams (num_attention_heads x head dim)",
    "num_attention_heads": "attention heads (split across TP ranks)",
    "ffn_hidden_size": "MLP width (null: 4 x hidden_size, as diffusers)",
    "joint_attention_dim": "text feature width (Qwen2.5-VL hidden size)",
    "in_channels": "packed latent channels (out_channels x patch_size^2)",
    "out_channels": "VAE latent channels",
    "patch_size": "latent patch size (2: 2x2 packing)",
    "axes_dims_rope": "MSRoPE frame/height/width dims, summing to the head dim",
    "layernorm_epsilon": "epsilon of every norm",
    "rope_theta": "RoPE base",
    "zero_cond_t": "Qwen-Image-Edit-2511: condition-image tokens modulated at timestep 0 (no extra weights; "
                   "must match the checkpoint's config)",
}, doc="The MMDiT's architecture: fields of QwenImageConfig (released model's defaults).")

ParallelismSection = section("ParallelismSection", QwenImageConfig, {
    "tensor_model_parallel_size": "TP size; data-parallel size = world size / TP",
    "sequence_parallel": "split the residual streams' tokens over the TP group between the TP regions "
                         "(megatron's sequence parallelism: 1/TP of the per-token work and activations; needs TP > 1)",
    "use_cpu_initialization": "initialise each full weight on CPU from the seed and slice this rank's shard, so "
                              "the initial model does not depend on the TP layout (null: true on CPU, false on GPU)",
}, doc="How the model is split: fields of QwenImageConfig (megatron's ModelParallelConfig).")

RecomputeSection = section("RecomputeSection", QwenImageConfig, {
    "recompute_granularity": "activation recompute: full (whole blocks), selective (parts), or null (off)",
    "recompute_method": "full recompute: uniform or block",
    "recompute_num_layers": "full recompute: blocks per unit (uniform) or recomputed blocks (block)",
    "recompute_modules": "selective recompute: of core_attn, layernorm, mlp (null: megatron's [core_attn])",
}, doc="Activation checkpointing: fields of QwenImageConfig (megatron's TransformerConfig).")

OptimizerSection = section("OptimizerSection", OptimizerConfig, {
    "optimizer": "adam (AdamW) or sgd",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the decay",
    "weight_decay": "decoupled weight decay",
    "adam_beta1": "Adam beta1",
    "adam_beta2": "Adam beta2",
    "adam_eps": "Adam epsilon",
    "clip_grad": "global gradient-norm clip (0 disables it)",
    "use_distributed_optimizer": "shard fp32 main params and Adam states over data-parallel ranks",
}, defaults={"lr": 1e-4, "min_lr": 0.0, "weight_decay": 0.0, "use_distributed_optimizer": True},
    choices={"optimizer": ("adam", "sgd")}, doc="megatron's OptimizerConfig.")

_DDPKeys = section("_DDPKeys", DistributedDataParallelConfig, {
    "grad_reduce_in_fp32": "keep the gradient buffer and its reductions in fp32",
    "check_for_nan_in_grad": "stop on a NaN or Inf gradient",
    "bucket_size": "elements per gradient bucket, with overlap_grad_reduce (null: megatron's default, "
                   "max(40M, 1M x DP)); without it the whole buffer is one bucket",
}, defaults={"grad_reduce_in_fp32": True, "check_for_nan_in_grad": True})


def _automatic(help_text: str):
    """A bool key of DistributedDataParallelConfig that may be null (automatic); resolved by resolve_overlap."""
    return field(default=None, metadata={"help": help_text, "from": DistributedDataParallelConfig.__name__})


@dataclass
class DDPSection(_DDPKeys):
    """megatron's DistributedDataParallelConfig."""

    # megatron's fields are plain bools; null (automatic) needs Optional, hence declared here.
    overlap_grad_reduce: Optional[bool] = _automatic(
        "reduce(-scatter) gradient buckets during the backward of the last micro-batch (null: on when "
        "data-parallel size > 1 or overlap_param_gather=true)")
    overlap_param_gather: Optional[bool] = _automatic(
        "all-gather the distributed optimizer's updated params bucket by bucket in the next forward "
        "(null: on when data-parallel size > 1 with optimizer.use_distributed_optimizer and overlap_grad_reduce)")


def resolve_overlap(ddp: DDPSection, use_distributed_optimizer: bool, data_parallel_size: int) -> tuple[bool, bool]:
    """(overlap_grad_reduce, overlap_param_gather) with null (automatic) filled in for this DP size. Raises
    ConfigError for what megatron-LM refuses: the param all-gather overlap without the distributed optimizer
    (there is no all-gather to overlap) or without overlap_grad_reduce."""
    param_gather = ddp.overlap_param_gather
    require(not (param_gather and not use_distributed_optimizer), "ddp.overlap_param_gather",
            "true needs optimizer.use_distributed_optimizer=true (it overlaps that optimizer's all-gather of "
            "updated params); set it to null or false")
    require(not (param_gather and ddp.overlap_grad_reduce is False), "ddp.overlap_param_gather",
            "true needs ddp.overlap_grad_reduce=true or null (megatron-LM's rule)")
    grad_reduce = (data_parallel_size > 1 or bool(param_gather)) if ddp.overlap_grad_reduce is None \
        else ddp.overlap_grad_reduce
    if param_gather is None:
        param_gather = data_parallel_size > 1 and use_distributed_optimizer and grad_reduce
    return grad_reduce, param_gather


LoaderSection = section("LoaderSection", BucketedLoader, {
    "streaming": "follow the manifest while producers write; epoch mode once the cache is sealed",
    "prefetch": "batches built ahead in the background (0: synchronously)",
    "num_workers": "reader threads building batches",
    "base_resolution": "use only buckets of this base resolution (256, 640, 1328; null: all)",
    "buckets": "use only these buckets, e.g. [640x480, 480x640] (null: all)",
    "verify": "checksums: sample (each sample on first read), full (whole shard on open), none",
    "stream_round_samples": "streaming: new samples per round (null: 8 x global batch)",
    "poll_interval_s": "streaming: seconds between looks at the manifest",
    "stream_timeout_s": "streaming: give up after waiting this long for producers (null: wait)",
    "wait_log_interval_s": "streaming: while waiting for producers, log what for every this many seconds",
    "max_open_shards": "memory-mapped shards kept open",
    "family_weights": "several bucket families in one stage with the share of the steps each gets, e.g. "
                      "{640: 0.7, 1328: 0.3} (null: base_resolution's family, or all)",
    "category_weights": "each category's share of a family's samples, from the samples' meta 'category' (the "
                        "producer's 'categories' section), '*' for the rest, e.g. {portrait: 0.2, "
                        "text_rendering: 0.2, '*': 0.6}; a category of no weight is left out (null: all as they come)",
    "task_weights": "text-to-image and editing in one job: the share of the steps each task gets, e.g. {t2i: 0.8, "
                    "ti2i: 0.2} (ti2i: samples with condition images; null: each in proportion to its samples)",
    "holdout_fraction": "hold out this fraction of the cache's sample keys (a fixed hash split) for the "
                        "validation loss; training never sees them",
    "pin_memory": "build batches in pinned host memory, for asynchronous host-to-GPU copies (null: when a GPU "
                  "is visible)",
}, choices={"verify": VERIFY_MODES}, doc="The latent cache's BucketedLoader (megatron_qwen_image.cache).")

SyntheticSection = section("SyntheticSection", SyntheticLatentBatches, {
    "resolutions": "pixel [height, width] of each bucket, multiples of 16",
    "text_len": "[min, max] caption tokens",
    "num_classes": "distinct learnable patterns",
}, defaults={"resolutions": [[64, 64]], "text_len": [4, 16]},
    doc="The flagged SYNTHETIC stand-in data (consumer.synthetic_data).")


@dataclass
class KernelsSection:
    """Which implementations run the model, chosen once at start-up and named in the banner."""

    fusion: str = option("auto", "the blocks' elementwise groups (adaLN norm + modulate, gated residual, q/k RMSNorm "
                                 "+ RoPE) and megatron's fused bias-GELU: compile (torch.compile), eager, or auto "
                                 "(compile on CUDA, eager on CPU)", choices=FUSION_MODES)
    transformer_impl: str = option("auto", "the blocks' linears and attention: transformer_engine, local "
                                           "(megatron-core's), or auto (Transformer Engine when it imports on a "
                                           "CUDA machine)", choices=TRANSFORMER_IMPLS)

    def fusion_backend(self, device_type: str) -> FusionBackend:
        return select_fusion(self.fusion, device_type)

    def layer_backend(self, device_type: str) -> BackendChoice:
        try:
            return block_spec_backend(self.transformer_impl, device_type)
        except ValueError as e:
            raise ConfigError("kernels.transformer_impl", str(e).split(": ", 1)[-1]) from None


@dataclass
class PrecisionSection:
    """Number formats."""

    bf16: Optional[bool] = option(None, "bf16 parameters and activations (null: bf16 on a GPU, fp32 on CPU)")


@dataclass
class TrainSection:
    """Batch sizes, length and seed of the run."""

    micro_batch_size: int = option(1, "samples per forward/backward on one rank")
    global_batch_size: int = option(1, "samples per step over all DP ranks = micro x DP x accumulation steps")
    train_iters: int = option(100, "training steps")
    seed: int = option(1234, "seed of the weights' initialisation and of every sample's noise and sigma")
    batching: str = option("fixed", "fixed: global_batch_size samples in every step; balanced: as many samples "
                           "as cost global_batch_size samples at balance_resolution (linear layers ~ tokens, "
                           "attention ~ tokens^2), micro-batches likewise from micro_batch_size (docs/curriculum.md)",
                           choices=("fixed", "balanced"))
    balance_resolution: int = option(640, "balanced batching: the reference sample is this many pixels squared")
    balance_text_tokens: int = option(512, "balanced batching: caption tokens per sample assumed in the cost")


@dataclass
class ScheduleSection:
    """megatron's OptimizerParamScheduler, with Megatron-LM's argument names; stepped once per iteration."""

    lr_warmup_init: float = option(0.0, "learning rate at step 0 of the warm-up")
    lr_warmup_iters: int = option(0, "warm-up steps (linear, to optimizer.lr)")
    lr_decay_iters: Optional[int] = option(None, "steps over which the learning rate decays (null: train.train_iters)")
    lr_decay_style: str = option("constant", "decay shape",
                                 choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"))
    lr_wsd_decay_iters: Optional[int] = option(None, "WSD: steps of the final decay")
    lr_wsd_decay_style: str = option("linear", "WSD: shape of the final decay",
                                     choices=("linear", "cosine", "exponential", "minus_sqrt"))


@dataclass
class DataSection:
    """Where batches come from: the latent cache (its loader's options under `cache`), or synthetic data."""

    source: str = option("synthetic", "batches from the latent cache, or the flagged synthetic stand-in",
                         choices=("synthetic", "cache"))
    cache_dir: Optional[str] = option(None, "the latent cache (with source=cache; --cache-dir)")
    cache: LoaderSection = field(default_factory=LoaderSection)
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)


@dataclass
class CheckpointSection:
    """Saving and resuming (docs/checkpoints.md); with neither save nor load set, no checkpoints."""

    save: Optional[str] = option(None, "checkpoint root to save to (--save)")
    save_interval: Optional[int] = option(None, "save every K steps (and at the end, and on SIGTERM)")
    keep_last: Optional[int] = option(None, "keep only the newest K checkpoints under save (null: all)")
    load: Optional[str] = option(None, "resume everything from this root's latest complete checkpoint (--load)")
    pretrained: Optional[str] = option(None, "start from these model weights only, e.g. imported diffusers "
                                       "weights, when load holds no checkpoint (--pretrained)")
    pretrained_optimizer: bool = option(False, "with pretrained: also take that training checkpoint's optimizer "
                                        "state (the next curriculum stage, docs/curriculum.md); the LR schedule, "
                                        "step and data position still start fresh (--pretrained-optimizer)")


@dataclass
class ValidationSection:
    """Every eval_interval steps: images of fixed prompts (grid PNG + TensorBoard) and a held-out loss at fixed
    sigmas (docs/training.md, "Validation"). Never changes training: a run with validation trains the same."""

    eval_interval: Optional[int] = option(None, "validate every K steps (--eval-interval; null: never)")
    prompts: Optional[str] = option(None, "encoded validation prompts: `python -m megatron_qwen_image.prompts encode "
                                    "PROMPTS --encoders DIR --out FILE` (null: no images)")
    encoders: Optional[str] = option(None, "Qwen-Image pipeline directory whose vae/ decodes the images (only the "
                                     "VAE decoder is loaded, by one process per data-parallel group)")
    steps: int = option(20, "sampling steps per image")
    guidance: float = option(4.0, "true classifier-free guidance scale for prompts with a negative prompt (<= 1: off)")
    batch_size: int = option(4, "images per sampling forward")
    samples_dir: Optional[str] = option(None, "where step_NNNNNN.png grids go (null: samples/ beside the stats JSONL)")
    loss_cache_dir: Optional[str] = option(None, "a held-out latent cache for the validation loss (null: the "
                                           "training cache's held-out keys when data.cache.holdout_fraction > 0)")
    loss_sigmas: list = option([0.1, 0.3, 0.5, 0.7, 0.9], "sigmas the validation loss is evaluated at")
    loss_samples: int = option(64, "held-out samples evaluated (the first in key-hash order)")
    loss_micro_batch_size: Optional[int] = option(None, "samples per validation-loss forward (null: "
                                                  "train.micro_batch_size)")


@dataclass
class LoggingSection:
    """Console, Python logging, JSONL and TensorBoard output."""

    log_interval: int = option(1, "print a console line every K steps (JSONL and TensorBoard get every step)")
    tensorboard_dir: Optional[str] = option(None, "TensorBoard event directory (--tensorboard-dir)")
    log_jsonl: Optional[str] = option(None, "per-step stats file (--log-jsonl; null: runs/TIME/stats.jsonl)")
    all_ranks: bool = option(False, "Python logging at INFO on every rank (default: rank 0 at INFO, the others "
                                    "WARNING); lines are prefixed [rank N]")


@dataclass
class TrainConfig:
    """Everything a training run is configured by; `load_config` builds it, `validate` checks it."""

    model: ModelSection = field(default_factory=ModelSection)
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)
    recompute: RecomputeSection = field(default_factory=RecomputeSection)
    kernels: KernelsSection = field(default_factory=KernelsSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    train: TrainSection = field(default_factory=TrainSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    ddp: DDPSection = field(default_factory=DDPSection)
    flow_matching: SigmaSampling = field(default_factory=SigmaSampling)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    # ---- derived -------------------------------------------------------------------------------
    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.parallelism.tensor_model_parallel_size

    def balanced_batches(self, data_parallel_size: int) -> Optional[BalancedBatches]:
        """The per-bucket batch sizes of train.batching=balanced (None: fixed)."""
        t = self.train
        if t.batching != "balanced":
            return None
        return BalancedBatches(t.global_batch_size, t.micro_batch_size, t.balance_resolution, t.balance_text_tokens,
                               self.model.hidden_size, data_parallel_size, self.model.ffn_hidden_size)

    def num_microbatches(self, world_size: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.data_parallel_size(world_size))

    @property
    def lr_decay_iters(self) -> int:
        return self.schedule.lr_decay_iters if self.schedule.lr_decay_iters is not None else self.train.train_iters

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- megatron-core's own config objects, built from the sections ----------------------------
    def model_config(self, bf16: bool, use_cpu_initialization: bool | None = None, tp_size: int | None = None,
                     perform_initialization: bool = True, fusion: FusionBackend = EAGER) -> QwenImageConfig:
        parallel = self.parallelism.build_kwargs()
        parallel["use_cpu_initialization"] = use_cpu_initialization
        if tp_size is not None:  # another layout of the same model (the planner builds it at TP=1)
            parallel["tensor_model_parallel_size"] = tp_size
            parallel["sequence_parallel"] = parallel["sequence_parallel"] and tp_size > 1
        return QwenImageConfig(**self.model.build_kwargs(), **parallel, **self.recompute.build_kwargs(),
                               **fusion.mlp_activation_fields(), bf16=bf16,
                               params_dtype=torch.bfloat16 if bf16 else torch.float32,
                               perform_initialization=perform_initialization)

    def optimizer_config(self, bf16: bool) -> OptimizerConfig:
        return OptimizerConfig(**self.optimizer.build_kwargs(), bf16=bf16, fp16=False,
                               params_dtype=torch.bfloat16 if bf16 else torch.float32)

    def ddp_config(self, data_parallel_size: int) -> DistributedDataParallelConfig:
        """megatron's DDP config, with the overlap keys' automatic (null) values resolved for this DP size."""
        distributed = self.optimizer.use_distributed_optimizer
        grad_reduce, param_gather = resolve_overlap(self.ddp, distributed, data_parallel_size)
        kwargs = {**self.ddp.build_kwargs(), "overlap_grad_reduce": grad_reduce, "overlap_param_gather": param_gather}
        return DistributedDataParallelConfig(**kwargs, use_distributed_optimizer=distributed)


# Where each QwenImageConfig field lives in this config (for naming the key of a model error).
_MODEL_FIELD_SECTION = {name: sec for sec, cls in (("model", ModelSection), ("parallelism", ParallelismSection),
                                                   ("recompute", RecomputeSection))
                        for name in (f.name for f in dataclasses.fields(cls))}


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                flags: Optional[dict] = None) -> TrainConfig:
    """Read a YAML config (with its `base:` chain), apply `key=value` overrides and flag values, validate."""
    cfg = layer.load(TrainConfig, path, overrides, flags)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig, world_size: Optional[int] = None, cuda_available: Optional[bool] = None) -> None:
    """Check every value and the relations between them. `world_size` adds the checks of a start: the
    parallel layout, that the cache directory is a cache, that checkpoint.load / pretrained name checkpoints
    (consumer.start_point); `cuda_available` the precision check."""
    try:  # the model's own checks: architecture, its TP split, recompute
        cfg.model_config(bf16=False, use_cpu_initialization=True, perform_initialization=False)
    except ModelConfigError as e:
        raise ConfigError(f"{_MODEL_FIELD_SECTION.get(e.field, 'model')}.{e.field}", e.message) from None

    t, o, s = cfg.train, cfg.optimizer, cfg.schedule
    require(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}")
    require(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
            f"{t.global_batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}")
    require(t.train_iters >= 1, "train.train_iters", f"must be >= 1, got {t.train_iters}")
    require(t.seed >= 0, "train.seed", "must be >= 0")
    if t.batching == "balanced":
        require(cfg.data.source == "cache", "train.batching", "balanced needs data.source=cache (batch sizes by bucket)")
        require(t.balance_resolution >= 16 and t.balance_resolution % 16 == 0, "train.balance_resolution",
                f"must be a positive multiple of 16, got {t.balance_resolution}")
        require(t.balance_text_tokens >= 0, "train.balance_text_tokens", f"must be >= 0, got {t.balance_text_tokens}")

    require(o.lr is not None and o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    require(o.min_lr is not None and 0 <= o.min_lr <= o.lr, "optimizer.min_lr",
            f"must be in [0, optimizer.lr={o.lr}], got {o.min_lr}")
    require(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    for key in ("adam_beta1", "adam_beta2"):
        require(0 <= getattr(o, key) < 1, f"optimizer.{key}", f"must be in [0, 1), got {getattr(o, key)}")
    require(o.adam_eps > 0, "optimizer.adam_eps", "must be > 0")
    require(o.clip_grad >= 0, "optimizer.clip_grad", "must be >= 0 (0 disables clipping)")
    require(cfg.ddp.bucket_size is None or cfg.ddp.bucket_size >= 1, "ddp.bucket_size",
            f"must be >= 1 or null, got {cfg.ddp.bucket_size}")
    resolve_overlap(cfg.ddp, o.use_distributed_optimizer, 1)  # its refusals do not depend on the DP size

    require(0 <= s.lr_warmup_init <= o.lr, "schedule.lr_warmup_init", f"must be in [0, optimizer.lr={o.lr}]")
    decay = cfg.lr_decay_iters
    require(decay >= 1, "schedule.lr_decay_iters", f"must be >= 1, got {decay}")
    require(0 <= s.lr_warmup_iters < decay, "schedule.lr_warmup_iters",
            f"must be in [0, lr_decay_iters={decay}) (megatron's OptimizerParamScheduler), got {s.lr_warmup_iters}")
    if s.lr_decay_style == "WSD":
        require(s.lr_wsd_decay_iters is not None and 1 <= s.lr_wsd_decay_iters <= decay,
                "schedule.lr_wsd_decay_iters", f"must be in [1, {decay}] with lr_decay_style=WSD")

    fm = cfg.flow_matching
    require(fm.logit_std > 0, "flow_matching.logit_std", f"must be > 0, got {fm.logit_std}")
    require(fm.shift > 0, "flow_matching.shift", f"must be > 0, got {fm.shift}")
    require(fm.max_image_seq_len > fm.base_image_seq_len >= 1, "flow_matching.max_image_seq_len",
            f"must be > base_image_seq_len={fm.base_image_seq_len}")

    d, c = cfg.data, cfg.data.cache
    for key, lo in (("prefetch", 0), ("num_workers", 1), ("max_open_shards", 1)):
        require(getattr(c, key) >= lo, f"data.cache.{key}", f"must be >= {lo}, got {getattr(c, key)}")
    for key in ("poll_interval_s", "wait_log_interval_s"):
        require(getattr(c, key) > 0, f"data.cache.{key}", f"must be > 0, got {getattr(c, key)}")
    for key, check in (("family_weights", check_family_weights), ("category_weights", check_category_weights),
                       ("task_weights", check_task_weights), ("holdout_fraction", check_fraction)):
        try:  # the loader's own checks of these arguments
            check(getattr(c, key))
        except ValueError as e:
            raise ConfigError(f"data.cache.{key}", str(e)) from None
    require(not (c.family_weights and c.base_resolution is not None), "data.cache.family_weights",
            f"selects the families itself: set data.cache.base_resolution=null (it is {c.base_resolution})")
    require(not (c.category_weights and d.source != "cache"), "data.cache.category_weights",
            "weighs the latent cache's categories: needs data.source=cache")
    require(not (c.task_weights and d.source != "cache"), "data.cache.task_weights",
            "weighs the latent cache's text-to-image and edit samples: needs data.source=cache")
    require(not (c.holdout_fraction > 0 and d.source != "cache"), "data.cache.holdout_fraction",
            "holds out keys of the latent cache: needs data.source=cache")
    res, factor = d.synthetic.resolutions, 8 * cfg.model.patch_size  # VAE factor x patch size
    require(len(res) >= 1 and all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and x > 0
                                                                             and x % factor == 0 for x in r)
                                  for r in res),
            "data.synthetic.resolutions", f"must be a list of [height, width] pixel sizes divisible by {factor}, got {res}")
    tl = d.synthetic.text_len
    require(len(tl) == 2 and all(isinstance(x, int) for x in tl) and 1 <= tl[0] <= tl[1], "data.synthetic.text_len",
            f"must be [min, max] with 1 <= min <= max, got {tl}")
    require(d.synthetic.num_classes >= 1, "data.synthetic.num_classes", "must be >= 1")

    require(cfg.logging.log_interval >= 1, "logging.log_interval", "must be >= 1")
    ck = cfg.checkpoint
    if ck.keep_last is not None:
        require(ck.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {ck.keep_last}")
    if ck.save_interval is not None:
        require(ck.save_interval >= 1, "checkpoint.save_interval", "must be >= 1")
        require(ck.save is not None, "checkpoint.save_interval", "needs checkpoint.save=DIR (--save)")

    validate_validation(cfg, world_size is not None)

    if cuda_available is not None:
        require(not (cfg.precision.bf16 and not cuda_available), "precision.bf16",
                "bf16=true needs a GPU; CPU runs are fp32 (set precision.bf16=null for automatic)")

    if world_size is not None:  # checks that only matter when training starts
        if d.source == "cache":
            require(bool(d.cache_dir), "data.cache_dir", "is required with data.source=cache (--cache-dir DIR)")
            require(os.path.isdir(d.cache_dir) or not os.path.exists(d.cache_dir), "data.cache_dir",
                    f"{d.cache_dir} is a file, not a latent cache directory")
            try:  # the cache's own check (marker present, format version readable), before any rank starts
                read_cache_file(d.cache_dir)
            except CacheFormatError as e:
                raise ConfigError("data.cache_dir", f"{e}; fill it with `python -m producer`" + (
                    ", or, to stream while producers start, create it first with "
                    "`python -m megatron_qwen_image.cache init DIR`" if c.streaming else "")) from None
        start_point(ck)  # refuses a --load / --pretrained that names no checkpoint
        tp = cfg.parallelism.tensor_model_parallel_size
        require(world_size % tp == 0, "parallelism.tensor_model_parallel_size",
                f"world size {world_size} is not divisible by tensor_model_parallel_size={tp}")
        dp = world_size // tp
        require(t.global_batch_size % (t.micro_batch_size * dp) == 0, "train.global_batch_size",
                f"{t.global_batch_size} is not a multiple of micro_batch_size x data-parallel size "
                f"= {t.micro_batch_size} x {dp}")


def validate_validation(cfg: TrainConfig, at_start: bool) -> None:
    """The `validation` section; `at_start`: also the files it names."""
    v = cfg.validation
    for key, lo in (("steps", 1), ("batch_size", 1), ("loss_samples", 1)):
        require(getattr(v, key) >= lo, f"validation.{key}", f"must be >= {lo}, got {getattr(v, key)}")
    require(v.guidance >= 0, "validation.guidance", f"must be >= 0, got {v.guidance}")
    require(v.loss_micro_batch_size is None or v.loss_micro_batch_size >= 1, "validation.loss_micro_batch_size",
            f"must be >= 1 or null, got {v.loss_micro_batch_size}")
    require(len(v.loss_sigmas) >= 1 and all(isinstance(s, (int, float)) and 0 < s <= 1 for s in v.loss_sigmas),
            "validation.loss_sigmas", f"must be a non-empty list of sigmas in (0, 1], got {v.loss_sigmas}")
    if v.eval_interval is None:
        return
    require(v.eval_interval >= 1, "validation.eval_interval", f"must be >= 1 or null, got {v.eval_interval}")
    has_loss = v.loss_cache_dir is not None or cfg.data.cache.holdout_fraction > 0
    require(bool(v.prompts) or has_loss, "validation.eval_interval",
            f"is {v.eval_interval} but there is nothing to validate: give validation.prompts (an encoded prompts file: "
            "`python -m megatron_qwen_image.prompts encode PROMPTS --encoders DIR --out FILE`) and/or a held-out "
            "set (validation.loss_cache_dir, or data.cache.holdout_fraction)")
    require(not v.prompts or bool(v.encoders), "validation.encoders",
            "is required with validation.prompts: the Qwen-Image pipeline directory whose vae/ decodes the images")
    if not at_start:
        return
    if v.prompts:
        try:
            check_encoded(load_encoded(v.prompts), cfg.model.joint_attention_dim)
        except PromptsFileError as e:
            raise ConfigError("validation.prompts", str(e)) from None
        try:
            component_dir(v.encoders, VAE)
        except EncoderDirError as e:
            raise ConfigError("validation.encoders", str(e)) from None
    if v.loss_cache_dir:
        require(os.path.isdir(v.loss_cache_dir), "validation.loss_cache_dir",
                f"{v.loss_cache_dir} is not a directory (a held-out latent cache, written by `python -m producer`)")
        try:
            read_cache_file(v.loss_cache_dir)
        except CacheFormatError as e:
            raise ConfigError("validation.loss_cache_dir", str(e)) from None


def resolve_precision(cfg: TrainConfig, cuda_available: bool) -> tuple[bool, bool]:
    """(bf16, use_cpu_initialization) with the automatic (null) values filled in."""
    bf16 = cuda_available if cfg.precision.bf16 is None else cfg.precision.bf16
    cpu_init = cfg.parallelism.use_cpu_initialization
    return bf16, (not cuda_available) if cpu_init is None else cpu_init
