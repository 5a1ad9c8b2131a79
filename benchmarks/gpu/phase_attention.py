"""Phase (c), attention: which SDPA kernel torch picks for the model's joint attention, and how fast it is.

Per resolution, S = image tokens + 1,024 text tokens (5,120 at 1024^2, 7,913 at 1328^2), 24 heads x 128, bf16,
in the model's layout: q, k, v sequence-first [S, B, H, D], joint order [image, text] (so a sample's text
padding is at the end), permuted to SDPA's [B, H, S, D] as SDPACoreAttention does. Three cases:
  unmasked  S tokens, one call, no mask (every caption 1,024 tokens long)
  masked    S tokens, one call with a bool key-padding mask [B, 1, 1, S]: 256 of the 1,024 text tokens valid
  packed    per sample, one call on its valid prefix (image + 256 tokens), no mask: what the model does for a
            padded batch, and what varlen attention would cost
For each case the default dispatch is profiled (its aten operator names which backend ran) and timed, then
each backend is forced with torch.nn.attention.sdpa_kernel([backend]); a backend that cannot take the case
records its error. TFLOP/s: forward 4*B*S^2*h; forward + backward counted as 3x forward (model FLOPs, as MFU;
flash's backward also recomputes Q K^T, so its hardware count is 3.5x). For the masked case the FLOPs on the
computed length and on the valid length ("useful") are both given.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_qwen_image.flops import TRAIN_FACTOR, attention_flops

from benchmarks.gpu.profiling import op_names, profile_call
from benchmarks.gpu.settings import Settings
from benchmarks.gpu.timing import Budget, time_calls

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}

# The aten operator each backend dispatches to (CUDA names; the CPU flash one ends in _for_cpu).
_BACKEND_OPS = (("cudnn", "_scaled_dot_product_cudnn_attention"),
                ("efficient", "_scaled_dot_product_efficient_attention"),
                ("flash", "_scaled_dot_product_flash_attention"),
                ("math", "_scaled_dot_product_attention_math"))


@dataclass(frozen=True)
class AttentionCase:
    name: str
    resolution: str
    seq: int            # computed sequence length per call
    valid_seq: int      # valid tokens per sample (image first, then valid text)
    masked: bool        # one call with a bool key mask
    per_sample: bool    # one call per sample (batch 1 each)


def attention_cases(settings: Settings) -> list[AttentionCase]:
    cases = []
    for res in settings.resolutions:
        n_img, label = settings.image_tokens(res), f"{res[0]}x{res[1]}"
        full, valid = n_img + settings.attn_text, n_img + settings.attn_text_valid
        cases += [AttentionCase("unmasked", label, full, full, masked=False, per_sample=False),
                  AttentionCase("masked", label, full, valid, masked=True, per_sample=False),
                  AttentionCase("packed", label, valid, valid, masked=False, per_sample=True)]
    return cases


def backend_from_ops(names: list[str]) -> str:
    """The SDPA backend a profile shows ('unknown' when no SDPA operator appears)."""
    found = [backend for backend, op in _BACKEND_OPS if any(op in n for n in names)]
    return "+".join(found) if found else "unknown"


def _inputs(case: AttentionCase, settings: Settings, device, dtype):
    """q, k, v leaves [S, B, H, D]; the bool mask [B, 1, 1, S] (masked case); the output gradients."""
    b, heads, d = settings.micro_batch, settings.dims.heads, settings.dims.head_dim
    q, k, v = (torch.randn(case.seq, b, heads, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = None
    if case.masked:  # [image, text]: the text past the valid tokens is padding, at the end
        key_valid = torch.ones(b, case.seq, dtype=torch.bool, device=device)
        key_valid[:, case.valid_seq:] = False
        mask = key_valid[:, None, None, :]
    calls = [slice(i, i + 1) for i in range(b)] if case.per_sample else [slice(0, b)]
    grads = [torch.randn(c.stop - c.start, heads, case.seq, d, device=device, dtype=dtype) for c in calls]
    return q, k, v, mask, calls, grads


def _sdpa(q, k, v, mask, batch: slice):
    """SDPA on the samples `batch` of sequence-first [S, B, H, D] leaves, as SDPACoreAttention calls it."""
    q, k, v = (t[:, batch].permute(1, 2, 0, 3) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[batch], dropout_p=0.0,
                                          is_causal=False)


def _measure(fwd, fwd_bwd, case: AttentionCase, settings: Settings, device, budget: Budget) -> dict:
    t_fwd = time_calls(fwd, device, settings.warmup, settings.iters, budget=budget)
    t_fb = time_calls(fwd_bwd, device, settings.warmup, settings.iters, budget=budget)
    b = settings.micro_batch
    computed = attention_flops(case.seq, settings.dims, b)
    useful = attention_flops(case.valid_seq, settings.dims, b)
    out = {"fwd_ms": t_fwd.median_s * 1e3, "fwd_bwd_ms": t_fb.median_s * 1e3,
           "tflops_fwd": computed / t_fwd.median_s / 1e12,
           "tflops_fwd_bwd": TRAIN_FACTOR * computed / t_fb.median_s / 1e12}
    if case.masked:
        out["useful_tflops_fwd_bwd"] = TRAIN_FACTOR * useful / t_fb.median_s / 1e12
    return out


def run_case(case: AttentionCase, settings: Settings, device, dtype, budget: Budget) -> dict:
    q, k, v, mask, calls, grads = _inputs(case, settings, device, dtype)

    def fwd():
        with torch.no_grad():
            return [_sdpa(q, k, v, mask, c) for c in calls]

    def fwd_bwd():
        outs = [_sdpa(q, k, v, mask, c) for c in calls]
        return torch.autograd.grad(outs, (q, k, v), grads)  # no .grad accumulation kernels

    record = {"case": case.name, "resolution": case.resolution, "seq": case.seq, "valid_seq": case.valid_seq,
              "batch": settings.micro_batch, "calls": len(calls), "heads": settings.dims.heads,
              "head_dim": settings.dims.head_dim,
              "gflop_fwd": attention_flops(case.seq, settings.dims, settings.micro_batch) / 1e9}
    fwd_bwd()  # first call outside the profiler: kernel selection and library loading
    split, prof = profile_call(fwd_bwd, device)
    names = op_names(prof)
    record["default_backend"] = backend_from_ops(names)
    record["default_top_kernels"] = [{"name": n[:160], "ms": ms} for n, ms, _ in split.top[:4]]
    record["default"] = _measure(fwd, fwd_bwd, case, settings, device, budget)
    record["backends"] = {}
    for name, backend in BACKENDS.items():
        if budget.expired:
            record["backends"][name] = {"ok": False, "error": budget.skip_note("backend")}
            continue
        try:
            with sdpa_kernel([backend]):
                fwd_bwd()
                record["backends"][name] = {"ok": True, **_measure(fwd, fwd_bwd, case, settings, device, budget)}
        except RuntimeError as e:  # "No available kernel", or out of memory for the math backend
            record["backends"][name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    ran = {n: r["fwd_bwd_ms"] for n, r in record["backends"].items() if r.get("ok")}
    if ran:  # the forced backend whose time is nearest the default's: a second opinion on the profile
        record["closest_timed_backend"] = min(ran, key=lambda n: abs(ran[n] - record["default"]["fwd_bwd_ms"]))
    return record


def run_attention(settings: Settings, budget: Budget) -> dict:
    device, dtype = settings.torch_device, settings.dtype
    cases, notes = [], []
    for case in budget.items(attention_cases(settings), notes, lambda c: f"attention {c.name} {c.resolution}"):
        cases.append(run_case(case, settings, device, dtype, budget))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the math backend's S^2 buffers
    summary = "; ".join(f"{c['resolution']} {c['case']}: {c['default_backend']} "
                        f"{c['default']['tflops_fwd_bwd']:.0f} TFLOP/s" for c in cases)
    return {"cases": cases, "notes": notes, "dtype": str(dtype), "summary": summary}
