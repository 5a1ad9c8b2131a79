"""Train the Qwen-Image MMDiT with flow matching on megatron-core (TP x DP, distributed optimizer, recompute).

    torchrun --standalone --nproc-per-node 2 -m consumer.train --config configs/smoke_tp2.yaml [key=value ...]
        [--data synthetic | --data cache --cache-dir DIR] [--tensorboard-dir DIR] [--log-jsonl FILE]
    python -m consumer.train --config configs/model/qwen_image_20b.yaml --dry-run --dp 8   # memory plan
    python -m consumer.launch --standalone --nproc-per-node 2 -- --config ...   # torchrun, config checked first

One iteration: take this rank's share of the global batch from the data iterator, split it into
micro-batches; for each: pack latents 2x2, draw noise and logit-normal sigma per sample, x_t, forward,
MSE against v = noise - x0 on the image tokens, backward (grad sync deferred to the last micro-batch);
then megatron's finalize_model_grads (reduce-scatter / all-reduce over DP), optimizer.step (clip, Adam,
all-gather of the updated shards), LR scheduler step. With ddp.overlap_grad_reduce (automatic at DP > 1) the
last micro-batch's backward already reduces each gradient bucket as it fills, and finalize_model_grads only
waits; with ddp.overlap_param_gather the all-gather moves from optimizer.step into the next forward's
pre-hooks (consumer.checkpointing syncs the params before a save). No host sync inside the micro-batch loop
(loss, grad norm and the stop flag are read once per step). Works the same on GPUs (bf16) and CPU (fp32,
gloo, megatron_qwen_image.cpu_emulation).

Checkpoints: everything a checkpoint needs lives in one `TrainState`; the loop calls
`checkpointer.load(state)` once and `checkpointer.maybe_save(state)` after every step. The checkpointer
(consumer.checkpointing) is always built; the `checkpoint` config section turns saving and loading on.

Refusals: a bad configuration, a --cache-dir that is not a cache or can never give a batch, a --load that
names no checkpoint are found before the model is built and end the program with one line
`error: config key '...': ...` (from rank 0 only) and exit code 2. consumer.launch runs the same checks
once before torchrun starts any worker (torchrun itself reports failed workers with a ChildFailedError block).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import USING_PYTORCH_OPTIMIZER

from consumer import builders
from consumer.checkpointing import Checkpointer, disable_pre_hooks, enable_pre_hooks
from consumer.config import TrainConfig, load_config, resolve_precision, validate
from consumer.metrics import MetricsLogger, data_summary
from consumer.planner import (PlanInputError, dry_run_activations, format_batch_plan, format_memory_plan,
                              plan_memory)
from consumer.rank_logging import configure_logging
from consumer.start_point import start_point
from consumer.validation import Validation, held_out_samples, loss_enabled
from megatron_qwen_image.cache import CacheFormatError
from megatron_qwen_image.cache.buckets import bucket_of_latent
from megatron_qwen_image.config import ConfigError, split_overrides
from megatron_qwen_image.flow_matching import SigmaSampling, draw_noise_and_sigmas, sample_losses
from megatron_qwen_image.megatron_compat import mark_gradless_params_ready
from megatron_qwen_image.model import pack_latents
from megatron_qwen_image.model.mmdit import prefix_lengths
from megatron_qwen_image.parallel import destroy_parallel, init_parallel


# --------------------------------------------------------------------------------------------------
# State and checkpoint seam
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything a resumed run needs. All randomness of a step is derived from (seed, step, sample key),
    so step + data-iterator position restore it exactly; no RNG state has to be saved for the objective."""

    cfg: TrainConfig
    model: Any                 # megatron DistributedDataParallel(QwenImageMMDiT)
    optimizer: Any             # megatron optimizer (DistributedOptimizer when use_distributed_optimizer)
    scheduler: Any             # megatron OptimizerParamScheduler
    data_iterator: Iterator[dict]
    step: int = 0              # completed iterations
    consumed_samples: int = 0
    extra: dict = field(default_factory=dict)  # room for other components' state


# --------------------------------------------------------------------------------------------------
# One iteration
# --------------------------------------------------------------------------------------------------
def host_text_lengths(text_mask: torch.Tensor) -> list[int]:
    """Valid text tokens per sample, read from the mask where the loader made it: on the host (no device
    sync). The valid tokens must come first, as every tokenizer pads (checked here, on the host)."""
    return prefix_lengths(text_mask, "batch['text_mask']")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A non-blocking copy (asynchronous from the loader's pinned buffers). Safe with the loader's buffer
    pool: a buffer is reused only after the batch is dropped, by which time train_step's loss.item() has
    waited for every copy of that step."""
    return t.to(device, non_blocking=True)


def microbatch_loss(model, batch: dict, sl: slice, step: int, cfg: TrainConfig, spec: SigmaSampling,
                    device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The flow-matching loss of the micro-batch `sl`, without a host sync: the text lengths come from the
    host mask, the tensors are copied as stored and cast on the device."""
    p = cfg.model.patch_size
    lengths = host_text_lengths(batch["text_mask"][sl])
    longest = max(max(lengths), 1)  # drop columns that are padding for every sample here
    z = to_device(batch["latents"][sl], device).to(torch.float32)
    _, c, h, w = z.shape
    x0 = pack_latents(z, p)
    noise, sigma = draw_noise_and_sigmas(batch["keys"][sl], step, cfg.train.seed, (c, h, w), x0.shape[1], spec,
                                         device)
    noise = pack_latents(noise, p)
    cond, cond_grids = condition_tokens(batch, sl, p, device)
    text = batch["text_embeds"][sl, :longest]
    if text.is_contiguous():
        text = to_device(text, device)
    else:  # copy whole rows and cut on the device: a strided host slice would be staged through unpinned memory
        text = to_device(batch["text_embeds"][sl], device)[:, :longest]
    return sample_losses(model, x0, noise, sigma, text.to(dtype), lengths, (h // p, w // p), dtype,
                         cond, cond_grids).mean()


def condition_tokens(batch: dict, sl: slice, p: int, device: torch.device):
    """An edit batch's condition images (batch["cond_latents"]: one [B, C, h, w] per image, the same shapes
    across the batch) packed and concatenated as the image stream takes them -> ([b, Nc, C] or None, their
    (h, w) patch grids); (None, []) for a text-to-image batch."""
    conds = batch.get("cond_latents") or []
    if not conds:
        return None, []
    packed = [pack_latents(to_device(c[sl], device).to(torch.float32), p) for c in conds]
    return torch.cat(packed, dim=1), [(c.shape[-2] // p, c.shape[-1] // p) for c in conds]


def step_batch_sizes(cfg: TrainConfig, dp_size: int, latent_hw, cond_shapes: tuple = ()) -> tuple[int, int]:
    """(global batch, micro-batch) of a step over latents of this (h, w) with condition latents of these (C, h, w):
    the config's, or with train.batching=balanced those of the batch's group, as the loader planned them
    (megatron_qwen_image.cache.batching)."""
    balanced = cfg.balanced_batches(dp_size)
    if balanced is None:
        return cfg.train.global_batch_size, cfg.train.micro_batch_size
    bucket = bucket_of_latent(tuple(latent_hw))
    return balanced.global_batch(bucket, cond_shapes), balanced.micro_batch(bucket, cond_shapes)


def train_step(state: TrainState, batch: dict, ctx, spec: SigmaSampling, dtype: torch.dtype) -> dict:
    cfg, model, optimizer = state.cfg, state.model, state.optimizer
    h, w = batch["latents"].shape[-2:]
    cond_shapes = tuple(tuple(c.shape[1:]) for c in batch.get("cond_latents") or [])
    gbs, mb = step_batch_sizes(cfg, ctx.dp_size, (h, w), cond_shapes)
    local = batch["latents"].shape[0]
    if local != gbs // ctx.dp_size:
        raise ValueError(f"data iterator gave {local} samples; expected this step's global batch / dp = {gbs} / "
                         f"{ctx.dp_size}")
    num_micro = local // mb
    lr = optimizer.param_groups[0]["lr"]

    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = []
    for i in range(num_micro):
        sync = contextlib.nullcontext() if i == num_micro - 1 else model.no_sync()
        with sync:
            loss = microbatch_loss(model, batch, slice(i * mb, (i + 1) * mb), state.step, cfg, spec, ctx.device, dtype)
            (loss / num_micro).backward()
        losses.append(loss.detach())
    mark_gradless_params_ready(model)  # overlap_grad_reduce: the buckets of params without a gradient
    finalize_model_grads([model])
    ok, grad_norm, _ = optimizer.step()
    if ok:
        state.scheduler.step(increment=1)

    loss = torch.stack(losses).mean()
    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    loss = loss.item() / ctx.dp_size
    if cfg.optimizer.clip_grad <= 0:  # megatron computes the norm only when clipping (else it returns 0.0 or None)
        grad_norm = None
    p = cfg.model.patch_size
    cond_tokens = sum((c.shape[-2] // p) * (c.shape[-1] // p) for c in batch.get("cond_latents") or [])
    return {"loss": loss, "grad_norm": None if grad_norm is None else float(grad_norm), "lr": lr, "skipped": not ok,
            "latent_hw": [h, w], "samples": gbs, "micro_batch": mb, "image_tokens": gbs * (h // p) * (w // p),
            "task": batch.get("task", "t2i"), "cond_tokens": gbs * cond_tokens}


def data_counters(data_iterator, device: torch.device) -> dict:
    """The cache loader's skip and wait counters for the per-step stats, over all DP ranks: shards skipped
    (left out of the plan as unreadable, or found corrupt while reading: the most any DP rank skipped),
    samples skipped (each replaced by another of its bucket: summed), seconds waited for producers (the
    most of any DP rank). Empty for a data iterator without `stats` (the synthetic source)."""
    stats = getattr(data_iterator, "stats", None)
    if stats is None:
        return {}
    group = parallel_state.get_data_parallel_group()
    summed = torch.tensor([stats["skipped_samples"]], dtype=torch.float64, device=device)
    most = torch.tensor([stats["unreadable_shards"] + stats["corrupt_shards"], stats["wait_s"]], dtype=torch.float64,
                        device=device)
    dist.all_reduce(summed, group=group)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
    return {"skipped_shards": int(most[0]), "skipped_samples": int(summed[0]), "data_wait_s": round(float(most[1]), 3)}


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def check_start(cfg: TrainConfig, world_size: int, cuda_available: Optional[bool]) -> None:
    """Every check of a start that needs no process group, for a world of `world_size` processes: the
    configuration and layout, the cache (it is one, and it can give a batch), the checkpoint to load, the
    validation inputs (an encoded prompts file, a VAE, a held-out set that is not empty), and the precision
    against `cuda_available` (None: not checked). consumer.launch runs it before torchrun
    starts; raises ConfigError or CacheFormatError."""
    validate(cfg, world_size=world_size, cuda_available=cuda_available)
    if cfg.data.source == "cache":
        builders.build_cache_loader(cfg, 0, cfg.data_parallel_size(world_size)).close()
    if cfg.validation.eval_interval and loss_enabled(cfg):
        held_out_samples(cfg)


def setup(cfg: TrainConfig, data_iterator: Optional[Iterator[dict]] = None):
    """Process groups, data, model, DDP, optimizer, scheduler -> (TrainState, ParallelContext, dtype). The
    data comes first: its checks (an empty cache, all buckets lost) fail before the model is built."""
    cuda = torch.cuda.is_available()
    validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", 1)), cuda_available=cuda)
    ctx = init_parallel(cfg.parallelism.tensor_model_parallel_size, cfg.train.seed)
    data = data_iterator if data_iterator is not None else builders.build_data_iterator(cfg, ctx)
    bf16, cpu_init = resolve_precision(cfg, cuda)
    fusion, layers = cfg.kernels.fusion_backend(ctx.device.type), cfg.kernels.layer_backend(ctx.device.type)
    model_config = cfg.model_config(bf16, cpu_init, fusion=fusion)
    model = builders.build_model(model_config, ctx.device, fusion, layers)
    ddp_model = builders.wrap_ddp(model, model_config, cfg, ctx.dp_size)
    optimizer = builders.build_optimizer(ddp_model, cfg, bf16)
    scheduler = builders.build_scheduler(optimizer, cfg)
    state = TrainState(cfg=cfg, model=ddp_model, optimizer=optimizer, scheduler=scheduler, data_iterator=data)
    if ctx.is_main:
        t = cfg.train
        n_local = sum(p.numel() for p in model.parameters())
        print(f"megatron-qwen-image: world {ctx.world_size} = TP {ctx.tp_size} x DP {ctx.dp_size} | "
              f"{'bf16' if bf16 else 'fp32'} on {ctx.device}"
              f"{' (CPU emulation of megatron-core CUDA placements)' if ctx.cpu_emulation else ''} | "
              f"{n_local:,} params on rank 0 | distributed optimizer {cfg.optimizer.use_distributed_optimizer} | "
              f"recompute {cfg.recompute.recompute_granularity or 'off'} | "
              f"sequence parallel {_on(model_config.sequence_parallel)} | "
              f"layers {layers.name} ({layers.reason}) | elementwise {fusion.name} | "
              f"overlap grad-reduce {_on(ddp_model.ddp_config.overlap_grad_reduce)}, "
              f"param-gather {_on(ddp_model.ddp_config.overlap_param_gather)} | "
              f"{'torch.optim.AdamW (no TE/apex)' if USING_PYTORCH_OPTIMIZER else 'fused Adam'} | global batch "
              f"{t.global_batch_size} = micro {t.micro_batch_size} x DP {ctx.dp_size} x "
              f"{cfg.num_microbatches(ctx.world_size)} accumulation"
              + (f" at {t.balance_resolution}px, compute-balanced per bucket" if t.batching == "balanced" else "")
              + f" | {start_point(cfg.checkpoint).describe()}",
              flush=True)
        for describe in ("describe_categories", "describe_tasks"):
            line = getattr(data, describe, lambda: None)()
            if line:
                print(f"data: {line}", flush=True)
    return state, ctx, (torch.bfloat16 if bf16 else torch.float32)


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def train(cfg: TrainConfig, data_iterator: Optional[Iterator[dict]] = None, make_checkpointer=Checkpointer) -> list[dict]:
    """Run training to train.train_iters; return the per-step records (every rank gets the same losses).
    `data_iterator` replaces the configured data; `make_checkpointer(cfg, ctx)` builds the checkpointer."""
    state, ctx, dtype = setup(cfg, data_iterator)
    checkpointer = make_checkpointer(cfg, ctx)
    # As megatron-LM's loop: with overlap_param_gather the all-gather pre-hooks stay off until a step has
    # succeeded, so that a bad load or initialisation is not all-gathered into the other DP ranks.
    hooks_paused = disable_pre_hooks(state.model, param_sync=False)
    checkpointer.load(state)
    log, iters = cfg.logging, cfg.train.train_iters
    jsonl = log.log_jsonl or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"), "stats.jsonl")
    logger = MetricsLogger(ctx.is_main, iters, log.log_interval, log.tensorboard_dir, jsonl)
    validation = Validation(cfg, ctx, run_dir=os.path.dirname(os.path.abspath(jsonl)))
    if ctx.is_main:
        print(f"stats -> {jsonl}" + (f" | tensorboard -> {log.tensorboard_dir}" if log.tensorboard_dir else ""),
              flush=True)
    records = []
    try:
        while state.step < iters:
            t0 = time.perf_counter()
            batch = next(state.data_iterator)
            stats = train_step(state, batch, ctx, cfg.flow_matching, dtype)
            if hooks_paused and not stats["skipped"]:
                enable_pre_hooks(state.model)
                hooks_paused = False
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            state.step += 1
            state.consumed_samples += stats["samples"]
            record = {"step": state.step, **stats, "step_time_s": dt, "samples_per_s": stats["samples"] / dt,
                      "image_tokens_per_s": stats["image_tokens"] / dt,
                      "consumed_samples": state.consumed_samples, **data_counters(state.data_iterator, ctx.device)}
            grid = None
            if validation.due(state.step):
                val_stats, grid = validation.run(state.model, state.step, dtype)
                record.update(val_stats)
            records.append(record)
            logger.log(record, grid)
            if checkpointer.maybe_save(state):
                break
        disable_pre_hooks(state.model, param_sync=True)  # as megatron-LM ends: complete params on every rank
    finally:
        logger.close()
        checkpointer.close()
    if ctx.is_main and records and "skipped_shards" in records[-1]:
        print(data_summary(records[-1]), flush=True)
    return records


# Command-line flags: shorthands for config keys (any key can also be set as key=value).
FLAGS = {"data": "data.source", "cache_dir": "data.cache_dir", "tensorboard_dir": "logging.tensorboard_dir",
         "log_jsonl": "logging.log_jsonl", "save": "checkpoint.save", "save_interval": "checkpoint.save_interval",
         "keep_last": "checkpoint.keep_last", "load": "checkpoint.load", "pretrained": "checkpoint.pretrained",
         "pretrained_optimizer": "checkpoint.pretrained_optimizer", "eval_interval": "validation.eval_interval"}


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides, rest = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m consumer.train", description=__doc__.split("\n")[0],
                                epilog="Any config key can be set as key=value anywhere on the command line, e.g. "
                                       "optimizer.lr=3e-4 model.num_layers=4 (docs/configuration.md lists them).")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--data", choices=["synthetic", "cache"], help="batch source (data.source)")
    p.add_argument("--cache-dir", help="latent cache directory for --data cache (data.cache_dir)")
    p.add_argument("--tensorboard-dir", help="TensorBoard log dir (logging.tensorboard_dir)")
    p.add_argument("--log-jsonl", help="per-step stats JSONL file (logging.log_jsonl)")
    p.add_argument("--save", help="checkpoint root to save to (checkpoint.save; see docs/checkpoints.md)")
    p.add_argument("--save-interval", type=int, help="save every K steps (checkpoint.save_interval)")
    p.add_argument("--keep-last", type=int, help="keep only the newest K checkpoints (checkpoint.keep_last)")
    p.add_argument("--load", help="resume from this checkpoint root/dir if it holds one (checkpoint.load)")
    p.add_argument("--pretrained", help="start from these model weights only, e.g. imported diffusers weights "
                                        "(checkpoint.pretrained)")
    p.add_argument("--pretrained-optimizer", action="store_true", default=None,
                   help="with --pretrained: also take its optimizer state, for the next curriculum stage "
                        "(checkpoint.pretrained_optimizer)")
    p.add_argument("--eval-interval", type=int, help="validate every K steps: sample the validation prompts, "
                                                     "evaluate the held-out loss (validation.eval_interval)")
    p.add_argument("--dry-run", action="store_true", help="print the per-rank memory plan and exit (no allocation)")
    p.add_argument("--dp", type=int, help="data-parallel size for --dry-run (default: WORLD_SIZE / TP)")
    p.add_argument("--resolution", help="--dry-run: also plan activations for images of this many pixels: 1328 "
                                        "(square) or HEIGHTxWIDTH, e.g. 928x1664")
    p.add_argument("--micro-batch", type=int,
                   help="--dry-run: samples per micro-batch (default: train.micro_batch_size)")
    p.add_argument("--text-len", type=int, help="--dry-run: caption tokens per sample (default: 1024, the most)")
    p.add_argument("--gpu-memory", help="--dry-run: memory of one GPU, e.g. 80GB or 80GiB: recommend the cheapest "
                                        "recompute setting that fits")
    args = p.parse_args(rest)
    args.overrides = overrides
    return args


def config_from_args(args) -> TrainConfig:
    return load_config(args.config, args.overrides, {key: getattr(args, flag) for flag, key in FLAGS.items()})


# What a run refuses with one line and exit code 2: a bad configuration, or a --cache-dir that is not a cache.
REFUSALS = (ConfigError, CacheFormatError)


def refuse(error: Exception, printed: bool = True) -> int:
    """Print the refusal's one line (where `printed`: on one process of many) and return exit code 2."""
    if printed:
        print(f"error: {error}", file=sys.stderr, flush=True)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))  # torchrun's; every rank finds the same error, rank 0 says it
    try:
        cfg = config_from_args(args)
        planner_flags = (args.resolution, args.micro_batch, args.text_len, args.gpu_memory)
        if args.dry_run or any(flag is not None for flag in planner_flags):
            if not args.dry_run:
                raise PlanInputError("--resolution, --micro-batch, --text-len and --gpu-memory only apply with "
                                     "--dry-run", key="--dry-run")
            dp = args.dp or max(int(os.environ.get("WORLD_SIZE", 1)) // cfg.parallelism.tensor_model_parallel_size, 1)
            note = ("(precision.bf16=null: planned as a GPU run in bf16; pass precision.bf16=false for an fp32 plan)"
                    if cfg.precision.bf16 is None else "")
            memory = plan_memory(cfg, dp=dp)
            activations = dry_run_activations(cfg, memory, args.resolution, args.micro_batch, args.text_len,
                                              args.gpu_memory)  # checked before anything is printed
            batches = format_batch_plan(cfg, dp)
            print(format_memory_plan(memory, note) + "\n\n" + activations + (f"\n\n{batches}" if batches else ""))
            return 0
        configure_logging(f"rank {rank}", rank == 0 or cfg.logging.all_ranks)
        try:
            train(cfg)
        finally:
            destroy_parallel()
    except REFUSALS as e:
        return refuse(e, printed=rank == 0)
    return 0


if __name__ == "__main__":  # guard needed: dist_checkpointing's async writer re-imports __main__
    sys.exit(main())
