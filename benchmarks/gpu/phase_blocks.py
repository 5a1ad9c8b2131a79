"""Phase (d), blocks: 4 full-width dual-stream blocks, forward + backward, per resolution and recompute mode.

The blocks are the model's own (QwenImageConfig from the trainer's config with num_layers=4, built from
get_qwen_image_block_spec), at TP=1 in bf16. Inputs stand in for what the layers outside the blocks give, in
the blocks' sequence-first layout: the image stream [N, B, h], the text stream [L, B, h] (L = the micro-batch's
longest caption; shorter captions padded, their valid lengths passed as host ints as the trainer does),
temb [B, h] and the MSRoPE tables of the model's QwenMSRoPE. The streams and temb require gradients, as they
do inside the model.

Recompute: 'selective' is applied inside each block by its config (megatron's default module core_attn);
'full' checkpoints each block with megatron's tensor_parallel.checkpoint, as QwenImageMMDiT does for
recompute_method=uniform, recompute_num_layers=1.

Per (recompute, resolution): forward and backward times (median after warm-up), model and hardware FLOPs, MFU
and HFU; memory above the state that was already there (params, their grads, the inputs): what the forward
keeps for backward, and the peak during forward + backward, beside the activation planner's prediction; and
a torch.profiler split of one iteration's device time.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.spec_utils import build_module

from megatron_qwen_image.model import get_qwen_image_block_spec
from megatron_qwen_image.model.rope import QwenMSRoPE
from megatron_qwen_image.flops import VAE_FACTOR, training_step_flops, utilisation

from benchmarks.gpu.memory_plan import planned_activations
from benchmarks.gpu.profiling import profile_call
from benchmarks.gpu.settings import RecomputeMode, Settings
from benchmarks.gpu.timing import (Budget, PartTimer, allocated_bytes, free_device_memory, median_parts, peak_bytes,
                                   reset_peak_memory, synchronize)
from benchmarks.gpu.trainer_setup import bench_config, ensure_world


class BlockStack(torch.nn.Module):
    """num_layers QwenImageBlocks in sequence; with full recompute each block is one checkpoint."""

    def __init__(self, model_config, spec):
        super().__init__()
        self.config = model_config
        self.layers = torch.nn.ModuleList([build_module(spec, config=model_config, layer_number=i + 1)
                                           for i in range(model_config.num_layers)])

    def forward(self, img, txt, temb, rope, text_lengths):
        full = self.config.recompute_granularity == "full" and torch.is_grad_enabled()
        for layer in self.layers:
            if full:  # tensors only through the checkpoint; the host list text_lengths is closed over
                def run(img, txt, temb, *rope, layer=layer):
                    return layer(img, txt, temb, *rope, text_lengths)
                img, txt = tensor_parallel.checkpoint(run, self.config.distribute_saved_activations,
                                                      img, txt, temb, *rope)
            else:
                img, txt = layer(img, txt, temb, *rope, text_lengths)
        return img, txt


@dataclass
class BlockInputs:
    img: torch.Tensor                  # [N, B, h]
    txt: torch.Tensor                  # [L, B, h]
    temb: torch.Tensor                 # [B, h]
    rope: tuple                        # img_cos, img_sin, txt_cos, txt_sin
    text_lengths: Optional[list]       # valid text tokens per sample; None when nothing is padded
    grad_img: torch.Tensor
    grad_txt: torch.Tensor

    def args(self) -> tuple:
        return self.img, self.txt, self.temb, self.rope, self.text_lengths

    @property
    def output_bytes(self) -> int:
        return (self.img.numel() + self.txt.numel()) * self.img.element_size()


def block_inputs(settings: Settings, model_config, resolution, device, dtype) -> BlockInputs:
    b, h, text_len = settings.micro_batch, settings.dims.hidden, settings.text_len
    p = settings.dims.patch * VAE_FACTOR
    hp, wp = resolution[0] // p, resolution[1] // p
    img = torch.randn(hp * wp, b, h, device=device, dtype=dtype, requires_grad=True)
    txt = torch.randn(text_len, b, h, device=device, dtype=dtype, requires_grad=True)
    temb = torch.randn(b, h, device=device, dtype=dtype, requires_grad=True)
    rope = QwenMSRoPE(model_config.axes_dims_rope, model_config.rope_theta)([(1, hp, wp)], text_len, device=device)
    return BlockInputs(img, txt, temb, rope, settings.text_lengths, torch.randn_like(img), torch.randn_like(txt))


def measure(stack: BlockStack, inputs: BlockInputs, settings: Settings, mode: RecomputeMode, resolution,
            device, budget: Budget) -> dict:
    def forward():
        return stack(*inputs.args())

    def backward(out):
        torch.autograd.backward(out, (inputs.grad_img, inputs.grad_txt))

    def step():
        backward(forward())

    for _ in range(settings.warmup):  # also allocates the parameters' .grad, which then stay (accumulated)
        step()
    synchronize(device)
    iterations = []
    for _ in range(settings.iters):
        timer = PartTimer(device)
        with timer.part("forward"):
            out = forward()
        with timer.part("backward"):
            backward(out)
        del out
        iterations.append(timer.seconds)
        if budget.expired:
            break
    parts = median_parts(iterations)
    fwd_bwd = statistics.median(it["forward"] + it["backward"] for it in iterations)

    # memory: above what is there before the forward (params, grads, inputs, output grads); what the forward
    # keeps is what it leaves allocated, less its two outputs
    synchronize(device)
    base = allocated_bytes(device)
    reset_peak_memory(device)
    out = forward()
    synchronize(device)
    saved = None if base is None else allocated_bytes(device) - base - inputs.output_bytes
    backward(out)
    del out
    synchronize(device)
    peak = None if base is None else peak_bytes(device) - base

    split, _ = profile_call(step, device)

    flops = training_step_flops(settings.samples(resolution), settings.num_layers, settings.dims,
                                mode.granularity, mode.modules)
    return {
        "recompute": mode.name, "resolution": f"{resolution[0]}x{resolution[1]}",
        "image_tokens": settings.image_tokens(resolution), "text_len": settings.text_len,
        "text_valid": list(settings.text_valid), "micro_batch": settings.micro_batch,
        "forward_s": parts["forward"], "backward_s": parts["backward"], "fwd_bwd_s": fwd_bwd,
        "runs": iterations, "model_tflop": flops.model / 1e12, "hardware_tflop": flops.hardware / 1e12,
        "mfu": utilisation(flops.model, fwd_bwd, settings.peak_tflops),
        "hfu": utilisation(flops.hardware, fwd_bwd, settings.peak_tflops),
        "memory": {"base_bytes": base, "saved_after_forward_bytes": saved, "peak_above_base_bytes": peak},
        "profile": split.to_dict(),
    }


def run_blocks(settings: Settings, budget: Budget) -> dict:
    device, dtype = settings.torch_device, settings.dtype
    ensure_world(settings)
    results, notes = [], []
    for mode in budget.items(settings.recompute_modes, notes, lambda m: f"recompute {m.name}"):
        cfg = bench_config(settings, mode)
        # the trainer's choices (kernels section): compiled elementwise groups on CUDA, TE layers when installed
        fusion, layers = cfg.kernels.fusion_backend(device.type), cfg.kernels.layer_backend(device.type)
        model_config = cfg.model_config(bf16=settings.bf16, use_cpu_initialization=device.type == "cpu", fusion=fusion)
        spec = get_qwen_image_block_spec(**layers.spec_kwargs(), fusion=fusion)
        stack = BlockStack(model_config, spec).to(device)
        notes.append(f"recompute {mode.name}: layers {layers.name}, elementwise {fusion.name}")
        params = sum(p.numel() for p in stack.parameters())
        for res in budget.items(settings.resolutions, notes, lambda r: f"recompute {mode.name} at {r[0]}x{r[1]}"):
            inputs = block_inputs(settings, model_config, res, device, dtype)
            try:
                r = measure(stack, inputs, settings, mode, res, device, budget)
            except torch.cuda.OutOfMemoryError as e:
                r = {"recompute": mode.name, "resolution": f"{res[0]}x{res[1]}",
                     "error": f"out of memory: {str(e).splitlines()[0][:300]}"}
            plan = planned_activations(cfg, res, settings.micro_batch, settings.text_len, settings.bf16,
                                       settings.text_lengths)
            r["planned_activations"] = plan.to_dict()
            r["params"] = params
            if plan.layers_bytes and r.get("memory", {}).get("saved_after_forward_bytes") is not None:
                r["memory"]["saved_over_planned_layers"] = r["memory"]["saved_after_forward_bytes"] / plan.layers_bytes
            results.append(r)
            del inputs
            stack.zero_grad(set_to_none=True)
            free_device_memory(device)
        del stack
        free_device_memory(device)
    ok = [r for r in results if "error" not in r]
    summary = "; ".join(f"{r['resolution']} {r['recompute']}: {r['fwd_bwd_s'] * 1e3:.0f} ms, MFU {r['mfu']:.0%}"
                        for r in ok)
    return {"runs": results, "notes": notes, "dtype": str(dtype), "summary": summary or "no run finished"}
