"""Phase (e), the full optimizer step on the 4-block model, timed by part, through the trainer's own objects.

consumer.train.setup builds what a training run builds: the QwenImageMMDiT (4 full-width blocks plus the
layers outside them), megatron's DistributedDataParallel and DistributedOptimizer (a world of 1 process:
NCCL on a GPU), the LR scheduler. One iteration is consumer.train.train_step's, with a synchronised timer
around each part:
  zero_grad             model.zero_grad_buffer() + optimizer.zero_grad()
  forward               consumer.train.microbatch_loss: packing, noise and sigma, the model, the loss
  backward              loss.backward() (the gradients land in DDP's fp32 main_grad buffer)
  finalize_model_grads  megatron's finalize_model_grads (the DP reduce-scatter: a no-op-sized one at DP=1),
                        after train_step's mark_gradless_params_ready
  optimizer_step        optimizer.step(): grad norm + clip (megatron_compat's sync-free norm without
                        TE/apex), Adam on the fp32 main params, copy back to bf16
  scheduler_step        the LR scheduler
The batch is one fixed micro-batch at --step resolution (latents bf16 as the cache stores them, on the host
like the loader's), text padded to the longest caption. Memory, above what earlier phases left allocated:
what is allocated between steps (params, grad buffer, optimizer state) beside consumer.planner.plan_memory,
and the peak of a step beside plan_memory + the activation plan.
"""
from __future__ import annotations

import math
import statistics

import torch
from megatron.core.distributed import finalize_model_grads

from consumer.synthetic_data import LATENT_CHANNELS, VAE_FACTOR
from consumer.train import microbatch_loss, setup
from megatron_qwen_image.megatron_compat import mark_gradless_params_ready
from megatron_qwen_image.flops import training_step_flops, utilisation

from benchmarks.gpu.memory_plan import planned_activations, planned_state
from benchmarks.gpu.settings import Settings
from benchmarks.gpu.timing import (Budget, PartTimer, allocated_bytes, free_device_memory, median_parts, peak_bytes,
                                   reset_peak_memory, synchronize)
from benchmarks.gpu.trainer_setup import bench_config

PARTS = ("zero_grad", "forward", "backward", "finalize_model_grads", "optimizer_step", "scheduler_step")


def fixed_batch(settings: Settings, text_dim: int) -> dict:
    """One micro-batch in the loader's contract, text padded to settings.text_len with the valid lengths."""
    g = torch.Generator().manual_seed(settings.seed)
    b, (height, width) = settings.micro_batch, settings.step_resolution
    latents = torch.randn(b, LATENT_CHANNELS, height // VAE_FACTOR, width // VAE_FACTOR, generator=g)
    text = torch.randn(b, settings.text_len, text_dim, generator=g)
    mask = torch.arange(settings.text_len)[None, :] < torch.tensor(settings.text_valid)[:, None]
    store = settings.dtype
    return {"latents": latents.to(store), "text_embeds": (text * mask[..., None]).to(store), "text_mask": mask,
            "keys": [f"bench/{i:06d}" for i in range(b)]}


class RepeatBatch:
    """A data iterator that gives the same batch for ever (setup wants one; the timed loop does not use it)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.batch


def run_step(settings: Settings, budget: Budget) -> dict:
    mb = settings.micro_batch
    cfg = bench_config(settings, settings.step_recompute, [
        f"train.micro_batch_size={mb}", f"train.global_batch_size={mb}", "train.train_iters=1000000",
        "data.source=synthetic"])
    batch = fixed_batch(settings, cfg.model.joint_attention_dim)
    device = settings.torch_device
    free_device_memory(device)
    before = allocated_bytes(device) or 0  # what earlier phases left: not this phase's
    state, ctx, dtype = setup(cfg, RepeatBatch(batch))
    model, optimizer, scheduler, device = state.model, state.optimizer, state.scheduler, ctx.device

    def iteration(step: int) -> tuple[dict, float, float, bool]:
        timer = PartTimer(device)
        with timer.part("zero_grad"):
            model.zero_grad_buffer()
            optimizer.zero_grad()
        with timer.part("forward"):
            loss = microbatch_loss(model, batch, slice(0, mb), step, cfg, cfg.flow_matching, device, dtype)
        with timer.part("backward"):
            loss.backward()
        with timer.part("finalize_model_grads"):
            mark_gradless_params_ready(model)  # as train_step: with overlap_grad_reduce, the unused params' buckets
            finalize_model_grads([model])
        with timer.part("optimizer_step"):
            ok, grad_norm, _ = optimizer.step()
        with timer.part("scheduler_step"):
            if ok:
                scheduler.step(increment=1)
        return timer.seconds, float(loss.detach()), float(grad_norm) if grad_norm is not None else math.nan, ok

    for i in range(settings.warmup):  # the first step also creates the optimizer's state
        iteration(i)
    synchronize(device)
    state_bytes = allocated_bytes(device)  # between steps: params, grad buffer, optimizer state
    state_bytes = None if state_bytes is None else state_bytes - before
    reset_peak_memory(device)
    runs, losses, grad_norms = [], [], []
    for i in range(settings.iters):
        seconds, loss, grad_norm, ok = iteration(settings.warmup + i)
        runs.append(seconds)
        losses.append(loss)
        grad_norms.append(grad_norm)
        if budget.expired:
            break
    peak = peak_bytes(device)
    peak = None if peak is None else peak - before
    parts = median_parts(runs)
    step_s = statistics.median(sum(r.values()) for r in runs)
    flops = training_step_flops(settings.samples(settings.step_resolution), settings.num_layers, settings.dims,
                                settings.step_recompute.granularity, settings.step_recompute.modules,
                                include_outside=True)
    plan = planned_state(cfg, settings.bf16)
    acts = planned_activations(cfg, settings.step_resolution, mb, settings.text_len, settings.bf16,
                               settings.text_lengths)
    memory = {"state_bytes_measured": state_bytes, "state_bytes_planned": plan.total_bytes,
              "peak_bytes_measured": peak, "planned_activations": acts.to_dict()}
    if state_bytes is not None:
        memory["state_measured_over_planned"] = state_bytes / plan.total_bytes
    if peak is not None and acts.total_bytes:
        memory["peak_planned_bytes"] = plan.total_bytes + acts.total_bytes
        memory["peak_measured_over_planned"] = peak / memory["peak_planned_bytes"]
    finite = all(math.isfinite(x) for x in losses)
    res = settings.step_resolution
    return {
        "ok": finite, "resolution": f"{res[0]}x{res[1]}", "micro_batch": mb, "text_len": settings.text_len,
        "text_valid": list(settings.text_valid), "recompute": settings.step_recompute.name,
        "params": plan.params, "parts_median_s": parts, "step_median_s": step_s, "runs": runs,
        "losses": losses, "grad_norms": grad_norms, "model_tflop": flops.model / 1e12,
        "hardware_tflop": flops.hardware / 1e12, "mfu": utilisation(flops.model, step_s, settings.peak_tflops),
        "hfu": utilisation(flops.hardware, step_s, settings.peak_tflops), "memory": memory,
        "summary": f"step {step_s * 1e3:.0f} ms (" + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in parts.items())
                   + f" ms), MFU {utilisation(flops.model, step_s, settings.peak_tflops):.0%}"
                   + ("" if finite else ", LOSS NOT FINITE"),
    }
