"""Build the training objects from a TrainConfig: model config, model, megatron DDP, optimizer, LR scheduler, data.

Everything here is megatron-core's own machinery (DistributedDataParallel, get_megatron_optimizer,
OptimizerParamScheduler); on a machine without a GPU it runs through megatron_qwen_image.cpu_emulation
(turned on by megatron_qwen_image.parallel.init_parallel).
"""
from __future__ import annotations

from typing import Iterator

import torch

from megatron_qwen_image.config import TrainConfig
from megatron_qwen_image.parallel import ParallelContext


def build_model_config(cfg: TrainConfig, bf16: bool, use_cpu_initialization: bool, tp_size: int | None = None,
                       perform_initialization: bool = True):
    from megatron_qwen_image.model import QwenImageConfig

    m = cfg.model
    return QwenImageConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size, joint_attention_dim=m.joint_attention_dim,
        in_channels=m.in_channels, out_channels=m.out_channels, patch_size=m.patch_size,
        axes_dims_rope=tuple(m.axes_dims_rope), layernorm_epsilon=m.layernorm_epsilon,
        tensor_model_parallel_size=tp_size or cfg.tensor_model_parallel_size,
        recompute_granularity=cfg.recompute_granularity, recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        **({"recompute_modules": list(cfg.recompute_modules)} if cfg.recompute_modules is not None else {}),
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=use_cpu_initialization, perform_initialization=perform_initialization,
    )


def build_model(model_config, device: torch.device):
    """The unwrapped QwenImageMMDiT on `device` (initialised on CPU first when use_cpu_initialization)."""
    from megatron_qwen_image.model import QwenImageMMDiT

    model = QwenImageMMDiT(model_config)
    return model.to(device)


def wrap_ddp(model, model_config, cfg: TrainConfig):
    """megatron DistributedDataParallel: contiguous fp32 grad buffer, reduce(-scatter) in finish_grad_sync."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    return DistributedDataParallel(config=model_config, ddp_config=ddp_config, module=model)


def build_optimizer(ddp_model, cfg: TrainConfig, bf16: bool):
    """megatron's optimizer: DistributedOptimizer (state sharded over DP) or Float16/FP32 optimizer."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt_config = OptimizerConfig(
        optimizer=cfg.optimizer, lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad,
        bf16=bf16, fp16=False, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    return get_megatron_optimizer(opt_config, [ddp_model])


def build_scheduler(optimizer, cfg: TrainConfig):
    """megatron's OptimizerParamScheduler, stepped once per iteration (so its 'steps' are iterations)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.train_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=cfg.lr_warmup_init, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters, lr_decay_steps=decay, lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=cfg.train_iters,
        wd_incr_style="constant", wsd_decay_steps=cfg.lr_wsd_decay_iters, lr_wsd_decay_style=cfg.lr_wsd_decay_style,
    )


def build_data_iterator(cfg: TrainConfig, ctx: ParallelContext) -> Iterator[dict]:
    """This rank's batches: all ranks of a TP group share a dp_rank, hence identical batches."""
    if cfg.data == "cache":
        from megatron_qwen_image.cache import BucketedLoader

        return BucketedLoader(cfg.cache_dir, global_batch_size=cfg.global_batch_size, dp_rank=ctx.dp_rank,
                              dp_size=ctx.dp_size, seed=cfg.seed, streaming=cfg.cache_streaming,
                              prefetch=cfg.cache_prefetch,
                              # Keep the stored dtype (bf16 by default): the train step casts on the device,
                              # which is exact (bf16 -> fp32) and moves half the bytes through host memory.
                              output_dtype=None)
    from consumer.synthetic_data import SyntheticLatentBatches

    if ctx.is_main:
        print("WARNING: training on SYNTHETIC data (--data synthetic); use --data cache --cache-dir DIR for real "
              "latents", flush=True)
    return SyntheticLatentBatches(
        cfg.global_batch_size, ctx.dp_rank, ctx.dp_size, cfg.seed, text_dim=cfg.model.joint_attention_dim,
        resolutions=cfg.synthetic_resolutions, text_len=cfg.synthetic_text_len,
        num_classes=cfg.synthetic_num_classes)
