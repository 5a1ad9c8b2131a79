"""Build the training objects from a TrainConfig: model, megatron DDP, optimizer, LR scheduler, data.

Everything here is megatron-core's own machinery (DistributedDataParallel, get_megatron_optimizer,
OptimizerParamScheduler); on a machine without a GPU it runs through megatron_qwen_image.cpu_emulation
(turned on by megatron_qwen_image.parallel.init_parallel).
"""
from __future__ import annotations

from typing import Iterator

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from consumer.config import TrainConfig
from consumer.synthetic_data import SyntheticLatentBatches
from megatron_qwen_image.cache import BucketedLoader
from megatron_qwen_image.cache.loader import (MissingCategoryError, MissingFamilyError, MissingTaskError,
                                              NoTrainableDataError)
from megatron_qwen_image.config import ConfigError
from megatron_qwen_image.megatron_compat import use_sync_free_grad_norm
from megatron_qwen_image.model import QwenImageMMDiT, get_qwen_image_block_spec
from megatron_qwen_image.model.backends import BackendChoice
from megatron_qwen_image.model.fused import EAGER, FusionBackend
from megatron_qwen_image.parallel import ParallelContext


def build_model(model_config, device: torch.device, fusion: FusionBackend = EAGER,
                layers: BackendChoice | None = None):
    """The unwrapped QwenImageMMDiT on `device` (initialised on CPU first when use_cpu_initialization), its
    blocks built from the chosen layer backend and elementwise fusion (TrainConfig.kernels)."""
    spec = get_qwen_image_block_spec(**(layers.spec_kwargs() if layers else {}), fusion=fusion)
    return QwenImageMMDiT(model_config, block_spec=spec).to(device)


def wrap_ddp(model, model_config, cfg: TrainConfig, data_parallel_size: int):
    """megatron DistributedDataParallel: contiguous fp32 grad buffer; gradient buckets reduce(-scattered)
    during the last micro-batch's backward with overlap_grad_reduce (else all at once in finish_grad_sync);
    with overlap_param_gather, forward pre-hooks that all-gather the updated params bucket by bucket."""
    return DistributedDataParallel(config=model_config, ddp_config=cfg.ddp_config(data_parallel_size), module=model)


def build_optimizer(ddp_model, cfg: TrainConfig, bf16: bool):
    """megatron's optimizer: DistributedOptimizer (state sharded over DP) or Float16/FP32 optimizer. Its
    grad norm without TE/apex is megatron_compat's, which needs no host sync per gradient tensor."""
    use_sync_free_grad_norm()
    config = cfg.optimizer_config(bf16)
    # megatron keeps this copy of the DDP key "intended to have the same value" (OptimizerConfig's doc).
    config.overlap_param_gather = ddp_model.ddp_config.overlap_param_gather
    return get_megatron_optimizer(config, [ddp_model])


def build_scheduler(optimizer, cfg: TrainConfig):
    """megatron's OptimizerParamScheduler, stepped once per iteration (so its 'steps' are iterations)."""
    s, o = cfg.schedule, cfg.optimizer
    return OptimizerParamScheduler(
        optimizer, init_lr=s.lr_warmup_init, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=s.lr_warmup_iters, lr_decay_steps=cfg.lr_decay_iters, lr_decay_style=s.lr_decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=cfg.train.train_iters,
        wd_incr_style="constant", wsd_decay_steps=s.lr_wsd_decay_iters, lr_wsd_decay_style=s.lr_wsd_decay_style,
    )


def build_cache_loader(cfg: TrainConfig, dp_rank: int, dp_size: int) -> BucketedLoader:
    """The latent cache's loader for one DP rank, checked at once: a cache it can never take a batch from
    (empty, every bucket lost or filtered out) is refused as ConfigError('data.cache_dir')."""
    d, t = cfg.data, cfg.train
    # Keep the stored dtype (bf16 by default): the train step casts on the device, which is exact
    # (bf16 -> fp32) and moves half the bytes through host memory.
    loader = BucketedLoader(d.cache_dir, global_batch_size=t.global_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                            seed=t.seed, output_dtype=None, batching=cfg.balanced_batches(dp_size),
                            **d.cache.build_kwargs())
    try:
        loader.check_trainable()
    except NoTrainableDataError as e:
        loader.close()
        key = {MissingFamilyError: "data.cache.family_weights", MissingCategoryError: "data.cache.category_weights",
               MissingTaskError: "data.cache.task_weights"}
        raise ConfigError(key.get(type(e), "data.cache_dir"), str(e)) from None
    return loader


def build_data_iterator(cfg: TrainConfig, ctx: ParallelContext) -> Iterator[dict]:
    """This rank's batches: all ranks of a TP group share a dp_rank, hence identical batches."""
    d, t = cfg.data, cfg.train
    if d.source == "cache":
        return build_cache_loader(cfg, ctx.dp_rank, ctx.dp_size)
    if ctx.is_main:
        print("WARNING: training on SYNTHETIC data (data.source=synthetic); use --data cache --cache-dir DIR for real "
              "latents", flush=True)
    return SyntheticLatentBatches(t.global_batch_size, ctx.dp_rank, ctx.dp_size, t.seed,
                                  text_dim=cfg.model.joint_attention_dim, **d.synthetic.build_kwargs())
