"""--dry-run: the FLOP counts of every phase and the planned memory, with no GPU and nothing allocated.

Prints Markdown tables (docs/performance.md carries a copy) and returns the same figures as a dict; it never
writes benchmarks/results/gpu_step.json (only --out FILE, if given, gets the JSON).
"""
from __future__ import annotations

from dataclasses import asdict

from consumer.config import load_config
from megatron_qwen_image.flops import (TRAIN_FACTOR, ModelDims, attention_flops, block_forward_flops, image_tokens,
                                       outside_forward_flops, parameter_count, six_p_t_ratio, training_step_flops)

from benchmarks.gpu.memory_plan import NOT_AVAILABLE, planned_activations, planned_state
from benchmarks.gpu.phase_attention import attention_cases
from benchmarks.gpu.phase_gemm import gemm_shapes
from benchmarks.gpu.report import gib, markdown_table
from benchmarks.gpu.settings import FULL_MODEL_YAML, Settings
from benchmarks.gpu.trainer_setup import bench_config

REFERENCE_RESOLUTION = (1328, 1328)
REFERENCE_TEXT = 1024       # the model's maximum caption length
REFERENCE_TP = 4            # the 20B config's tensor-parallel size


def _ms_at_peak(flops: float, settings: Settings) -> float:
    return flops / (settings.peak_tflops * 1e12) * 1e3


def gemm_section(settings: Settings) -> tuple[str, list]:
    rows = [{"name": s.name, "rows_from": s.resolution, "m": s.m, "k": s.k, "n": s.n, "gflop": s.flops / 1e9,
             "us_at_peak": _ms_at_peak(s.flops, settings) * 1e3} for s in gemm_shapes(settings)]
    table = markdown_table(["GEMM", "rows from", "M", "K", "N", "GFLOP", "µs at peak"],
                           [[r["name"], r["rows_from"], r["m"], r["k"], r["n"], r["gflop"], r["us_at_peak"]]
                            for r in rows])
    return table, rows


def attention_section(settings: Settings) -> tuple[str, list]:
    b = settings.micro_batch
    rows = [{"resolution": c.resolution, "case": c.name, "seq": c.seq, "valid_seq": c.valid_seq, "batch": b,
             "fwd_gflop_computed": attention_flops(c.seq, settings.dims, b) / 1e9,
             "fwd_bwd_gflop_model": TRAIN_FACTOR * attention_flops(c.valid_seq, settings.dims, b) / 1e9}
            for c in attention_cases(settings)]
    table = markdown_table(["resolution", "case", "S computed", "S valid", "batch", "fwd GFLOP (computed S)",
                            "fwd+bwd model GFLOP (valid S)"],
                           [[r["resolution"], r["case"], r["seq"], r["valid_seq"], r["batch"], r["fwd_gflop_computed"],
                             r["fwd_bwd_gflop_model"]] for r in rows])
    return table, rows


def blocks_section(settings: Settings) -> tuple[str, str, list, list]:
    per_sample, per_step = [], []
    for res in settings.resolutions:
        label = f"{res[0]}x{res[1]}"
        for i, (n_img, valid) in enumerate(settings.samples(res)):
            f = block_forward_flops(n_img + valid, settings.dims)
            per_sample.append({"resolution": label, "sample": i, "image_tokens": n_img, "text_valid": valid,
                               "seq_valid": n_img + valid, "linear_gflop": f.linear / 1e9,
                               "attention_gflop": f.attention / 1e9, "modulation_gflop": f.modulation / 1e9,
                               "block_forward_gflop": f.total / 1e9})
        for mode in settings.recompute_modes:
            s = training_step_flops(settings.samples(res), settings.num_layers, settings.dims, mode.granularity,
                                    mode.modules)
            plan = planned_activations(bench_config(settings, mode), res, settings.micro_batch, settings.text_len,
                                       settings.bf16, settings.text_lengths)
            per_step.append({"resolution": label, "recompute": mode.name, "model_tflop": s.model / 1e12,
                             "hardware_tflop": s.hardware / 1e12, "ms_at_peak_model": _ms_at_peak(s.model, settings),
                             "planned_activations": plan.to_dict()})
    t1 = markdown_table(["resolution", "sample", "image tokens", "valid text", "S valid", "linear GFLOP",
                         "attention GFLOP", "modulation GFLOP", "block fwd GFLOP"],
                        [[r["resolution"], r["sample"], r["image_tokens"], r["text_valid"], r["seq_valid"],
                          r["linear_gflop"], r["attention_gflop"], r["modulation_gflop"], r["block_forward_gflop"]]
                         for r in per_sample])
    t2 = markdown_table([f"resolution ({settings.num_layers} blocks, micro-batch {settings.micro_batch})", "recompute",
                         "model TFLOP (MFU)", "hardware TFLOP (HFU)", "ms at peak (model)", "planned activations"],
                        [[r["resolution"], r["recompute"], r["model_tflop"], r["hardware_tflop"], r["ms_at_peak_model"],
                          _planned_text(r["planned_activations"], "layers_bytes")] for r in per_step])
    return t1, t2, per_sample, per_step


def _planned_text(plan: dict, key: str) -> str:
    return gib(plan[key]) if key in plan else plan.get("note", NOT_AVAILABLE)


def step_section(settings: Settings) -> tuple[str, str, dict]:
    res = settings.step_resolution
    samples = settings.samples(res)
    mode = settings.step_recompute
    blocks = training_step_flops(samples, settings.num_layers, settings.dims, mode.granularity, mode.modules)
    total = training_step_flops(samples, settings.num_layers, settings.dims, mode.granularity, mode.modules,
                                include_outside=True)
    outside = sum(outside_forward_flops(n, v, settings.dims) for n, v in samples)
    cfg = bench_config(settings, mode)
    state = planned_state(cfg, settings.bf16)
    acts = planned_activations(cfg, res, settings.micro_batch, settings.text_len, settings.bf16,
                               settings.text_lengths)
    rec = {"resolution": f"{res[0]}x{res[1]}", "micro_batch": settings.micro_batch, "recompute": mode.name,
           "blocks_forward_tflop": blocks.forward / 1e12, "outside_forward_tflop": outside / 1e12,
           "model_tflop": total.model / 1e12, "hardware_tflop": total.hardware / 1e12,
           "ms_at_peak_model": _ms_at_peak(total.model, settings), "planned_state": asdict(state),
           "planned_activations": acts.to_dict()}
    t1 = markdown_table(["resolution", "micro-batch", "recompute", "blocks fwd TFLOP", "outside fwd TFLOP",
                         "model TFLOP (MFU)", "ms at peak"],
                        [[rec["resolution"], rec["micro_batch"], mode.name, rec["blocks_forward_tflop"],
                          rec["outside_forward_tflop"], rec["model_tflop"], rec["ms_at_peak_model"]]])
    t2 = markdown_table(["parameters", "params (bf16)" if settings.bf16 else "params (fp32)", "grads (fp32)",
                         "optimizer", "state total", "planned activations", "planned peak"],
                        [[state.params, gib(state.param_bytes), gib(state.grad_bytes), gib(state.optimizer_bytes),
                          gib(state.total_bytes), _planned_text(rec["planned_activations"], "total_bytes"),
                          gib(state.total_bytes + acts.total_bytes) if acts.total_bytes else "n/a"]])
    return t1, t2, rec


def reference_section(settings: Settings) -> tuple[str, dict]:
    """The released model (60 blocks) at 1328^2 with 1,024 text tokens: the figures docs quote."""
    cfg = load_config(FULL_MODEL_YAML)
    dims, layers = ModelDims.from_model_section(cfg.model), cfg.model.num_layers
    n_img = image_tokens(*REFERENCE_RESOLUTION, dims)
    seq = n_img + REFERENCE_TEXT
    f = block_forward_flops(seq, dims)
    step = training_step_flops([(n_img, REFERENCE_TEXT)], layers, dims, include_outside=True)
    full = training_step_flops([(n_img, REFERENCE_TEXT)], layers, dims, "full", include_outside=True)
    params = parameter_count(dims, layers)
    rec = {"resolution": "1328x1328", "image_tokens": n_img, "text_tokens": REFERENCE_TEXT, "seq": seq,
           "hidden": dims.hidden, "num_layers": layers, "params": params,
           "per_block_forward_flops": f.linear + f.attention, "per_block_linear_flops": f.linear,
           "per_block_attention_flops": f.attention, "per_block_modulation_flops": f.modulation,
           "blocks_forward_tflop": layers * f.total / 1e12, "model_forward_tflop": step.forward / 1e12,
           "training_model_tflop": step.model / 1e12, "training_hardware_tflop_full_recompute": full.hardware / 1e12,
           "six_p_t_tflop": 6 * params * seq / 1e12,
           "six_p_t_over_model": six_p_t_ratio(dims, layers, n_img, REFERENCE_TEXT),
           f"s_per_sample_per_tp{REFERENCE_TP}_group_at_50pct_mfu":
               step.model / (0.5 * settings.peak_tflops * 1e12 * REFERENCE_TP)}
    table = markdown_table(
        ["released model, 1328² + 1,024 text", "value"],
        [["S = image + text tokens", f"{n_img:,} + {REFERENCE_TEXT:,} = {seq:,}"],
         ["per block forward, 2·S·12h² + 4·S²·h", f"{(f.linear + f.attention) / 1e12:.4f} TFLOP "
          f"({f.linear / 1e12:.4f} linear + {f.attention / 1e12:.4f} attention)"],
         ["per block modulation (once per sample)", f"{f.modulation / 1e9:.4f} GFLOP"],
         [f"{layers} blocks forward", f"{rec['blocks_forward_tflop']:.2f} TFLOP"],
         ["whole model forward (with img_in, txt_in, proj_out, ...)", f"{rec['model_forward_tflop']:.2f} TFLOP"],
         ["training step, model FLOPs (3× forward)", f"{rec['training_model_tflop']:.1f} TFLOP"],
         ["with full recompute, hardware FLOPs (4× forward)",
          f"{rec['training_hardware_tflop_full_recompute']:.1f} TFLOP"],
         [f"6·params·tokens ({params / 1e9:.2f} B params)", f"{rec['six_p_t_tflop']:.1f} TFLOP = "
                                                            f"{rec['six_p_t_over_model']:.2f}× the model FLOPs"],
         [f"s per sample per TP={REFERENCE_TP} group at 50 % MFU ({settings.peak_tflops:g} TFLOP/s per GPU)",
          f"{rec[f's_per_sample_per_tp{REFERENCE_TP}_group_at_50pct_mfu']:.3f} s"]])
    return table, rec


def dry_run(settings: Settings) -> tuple[str, dict]:
    """(printable Markdown, figures) of every phase's FLOPs and the planned memory."""
    g_table, g_rows = gemm_section(settings)
    a_table, a_rows = attention_section(settings)
    b_sample, b_step, b_rows, b_steps = blocks_section(settings)
    e_flops, e_mem, e_rec = step_section(settings)
    r_table, r_rec = reference_section(settings)
    d = settings.dims
    head = (f"GPU step benchmark, dry run ({'--tiny shapes' if settings.tiny else 'full size'}): FLOP counts and "
            f"planned memory, nothing measured. Model: hidden {d.hidden}, {d.heads} heads x {d.head_dim}, MLP {d.ffn}, "
            f"text width {d.text_dim}; phases d/e: {settings.num_layers} blocks, micro-batch {settings.micro_batch}, "
            f"text {settings.text_len} columns with {list(settings.text_valid)} valid; peak {settings.peak_tflops:g} "
            f"TFLOP/s.")
    text = "\n\n".join([
        head,
        "(b) GEMM ceiling: bf16 matmul shapes\n\n" + g_table,
        f"(c) attention: {d.heads} heads x {d.head_dim}, bf16\n\n" + a_table,
        "(d) blocks: forward FLOPs per block and sample (valid tokens)\n\n" + b_sample,
        "(d) blocks: one forward + backward of the micro-batch\n\n" + b_step,
        f"(e) optimizer step: the {settings.num_layers}-block model (FLOPs)\n\n" + e_flops,
        "(e) optimizer step: planned memory at TP=1, DP=1 (consumer.planner; activations from "
        "consumer.activation_plan)\n\n" + e_mem,
        "Reference: the released model\n\n" + r_table,
    ])
    record = {"dry_run": True, "settings": asdict(settings), "gemm": g_rows, "attention": a_rows,
              "blocks_per_sample": b_rows, "blocks_per_step": b_steps, "step": e_rec, "reference": r_rec}
    return text, record
