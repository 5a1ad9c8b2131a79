"""fused.py: the eager definitions are the model's numerics, the compiled backend matches them forward and
backward (also under megatron's recompute), megatron's fused bias-GELU is GELU(tanh), and the config pair
from mlp_activation_fields is what megatron's MLP needs to compute it.

Cost: the Inductor test compiles C++ with gcc: with an empty Inductor cache that is about a minute on 2 busy
cores (10 s with a warm one), so it is marked slow. megatron's own compiled bias-GELU is checked as a formula
(uncompiled): compiling it is torch's business and costs another minute. The other tests compile with dynamo's "eager" /
"aot_eager" backends (graph capture, AOTAutograd's joint graph and partition, no code generation) and take
seconds. The CUDA (Triton) code generation is tested only where a GPU is visible (marked gpu).
"""
import pytest
import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.fusions import fused_bias_gelu
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.transformer import mlp as megatron_mlp

from megatron_qwen_image import cpu_emulation
from megatron_qwen_image.model import fused
from megatron_qwen_image.model.config import QwenImageConfig, gelu_tanh
from megatron_qwen_image.model import QwenImageMMDiT, get_qwen_image_block_spec
from tests.reference_models import build_tiny_diffusers_transformer, make_inputs, megatron_from_diffusers, \
    single_process_model_parallel

EPS = 1e-6
S, B, HIDDEN, HEADS, HEAD_DIM, FFN = 6, 2, 32, 2, 16, 64


def group_inputs(dtype=torch.float32, seq=S):
    """One tiny sequence-first input set per group: name -> (function of the backend, tensors, which of them
    get gradients). RoPE's cos/sin get none, as in the model (they come from the no-grad MSRoPE)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype)

    cos_sin = torch.randn(seq, 1, 1, HEAD_DIM // 2, generator=g)
    return {
        "layer_norm_modulate": (lambda be: lambda x, shift, scale: be.layer_norm_modulate(x, shift, scale, EPS),
                                (randn(seq, B, HIDDEN, scale=3, shift=1), randn(1, B, HIDDEN), randn(1, B, HIDDEN)),
                                (True, True, True)),
        "gated_residual": (lambda be: be.gated_residual,
                           (randn(seq, B, HIDDEN), randn(1, B, HIDDEN), randn(seq, B, HIDDEN)), (True, True, True)),
        "rms_norm_rope": (lambda be: lambda x, w, cos, sin: be.rms_norm_rope(x, w, cos, sin, EPS),
                          (randn(seq, B, HEADS, HEAD_DIM, scale=2), randn(HEAD_DIM, shift=1),
                           cos_sin.cos(), cos_sin.sin()), (True, True, False, False)),
    }


def forward_backward(fn, tensors, needs_grad=None, through_recompute=False):
    """Output and the gradients of the inputs marked in `needs_grad` (default: all; weights included) for a
    fixed output gradient."""
    needs_grad = needs_grad or (True,) * len(tensors)
    leaves = [t.clone().requires_grad_(n) for t, n in zip(tensors, needs_grad)]
    out = tensor_parallel.checkpoint(fn, False, *leaves) if through_recompute else fn(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves if t.requires_grad]


def assert_close_rel(actual, expected, rel):
    """max |actual - expected| <= rel * max |expected|, per tensor (elementwise rtol is meaningless near 0)."""
    for a, e in zip(actual, expected):
        err = (a.double() - e.double()).abs().max().item()
        assert err <= rel * e.double().abs().max().item(), (err, e.abs().max().item())


def test_select_fusion_is_eager_on_cpu_and_compiled_on_cuda_for_auto():
    assert fused.select_fusion("auto", "cpu") is fused.EAGER
    assert fused.select_fusion("eager", "cuda") is fused.EAGER
    compiled = fused.select_fusion("auto", "cuda")
    assert compiled is fused.select_fusion("compile", "cpu") is fused.compiled_backend()  # built once
    assert (fused.EAGER.name, compiled.name) == ("eager", "compiled")
    assert fused.EAGER.mlp_activation_fields() == fused.mlp_activation_fields(False)
    assert compiled.mlp_activation_fields() == fused.mlp_activation_fields(True)
    with pytest.raises(ValueError, match="fusion must be one of"):
        fused.select_fusion("triton", "cuda")


# ------------------------------------------------------------------------------------- megatron's MLP path
class StubLinear(torch.nn.Module):
    """A linear with megatron's (output, bias) contract, so megatron's MLP builds without parallel_state."""

    def __init__(self, input_size, output_size, *, skip_bias_add, **unused):
        super().__init__()
        g = torch.Generator().manual_seed(input_size * 1000 + output_size)
        self.weight = torch.nn.Parameter(torch.randn(output_size, input_size, generator=g) * 0.3)
        self.bias = torch.nn.Parameter(torch.randn(output_size, generator=g))
        self.skip_bias_add = skip_bias_add

    def forward(self, x):
        out = x @ self.weight.t()
        return (out, self.bias) if self.skip_bias_add else (out + self.bias, None)


def tiny_config(**fields):
    return QwenImageConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
                           joint_attention_dim=16, axes_dims_rope=(4, 6, 6), **fields)


def mlp_forward(config, x):
    mlp = megatron_mlp.MLP(config, megatron_mlp.MLPSubmodules(linear_fc1=StubLinear, linear_fc2=StubLinear),
                           ffn_hidden_size=FFN)
    out, bias = mlp(x)
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    expected = fused.bias_gelu_tanh(x @ fc1.weight.t(), fc1.bias) @ fc2.weight.t()
    return out, bias, expected


@pytest.mark.parametrize("fused_flag", [True, False])
def test_mlp_activation_fields_make_megatron_mlp_compute_gelu_tanh(monkeypatch, fused_flag):
    """With either pair, megatron's MLP computes GELU(tanh)(fc1 + bias), taking its fused kernel iff fused.
    (megatron's bias_gelu_impl is replaced by a recording eager stand-in: its numerics are tested below.)"""
    calls = []

    def recording_bias_gelu(h, bias):
        calls.append(h.shape)
        return fused.bias_gelu_tanh(h, bias)

    monkeypatch.setattr(megatron_mlp, "bias_gelu_impl", recording_bias_gelu)
    x = torch.randn(S, B, HIDDEN)
    out, bias, expected = mlp_forward(tiny_config(**fused.mlp_activation_fields(fused_flag)), x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert bias is not None and len(calls) == (1 if fused_flag else 0)


def test_f_gelu_without_the_fusion_flag_is_erf_gelu_and_refused():
    """The trap mlp_activation_fields avoids: activation_func=F.gelu, bias_activation_fusion=False makes
    megatron's MLP compute erf-GELU, so QwenImageConfig refuses the pair."""
    with pytest.raises(ValueError, match="activation_func"):
        tiny_config(activation_func=F.gelu, bias_activation_fusion=False)
    config = tiny_config(activation_func=F.gelu, bias_activation_fusion=True)
    config.bias_activation_fusion = False  # what the check prevents
    out, _, expected = mlp_forward(config, torch.randn(S, B, HIDDEN) * 3)
    assert (out - expected).abs().max() > 1e-3


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_megatron_bias_gelu_formula_matches_gelu_tanh(monkeypatch, dtype, rel):
    """megatron's bias_gelu_impl (hand-written forward and backward, tanh form), run uncompiled: the same
    function as gelu_tanh(x + b) under autograd. fp32: its rounded constants (0.79788456, 0.1070322243)
    cost ~2e-7 of the backward's largest value. bf16: both round every op; about one ulp apart."""
    for name in ("bias_gelu", "bias_gelu_back"):
        monkeypatch.setattr(fused_bias_gelu, name, getattr(fused_bias_gelu, name)._torchdynamo_orig_callable)
    g = torch.Generator().manual_seed(0)
    h, bias = (torch.randn(S, B, FFN, generator=g) * 3).to(dtype), torch.randn(FFN, generator=g).to(dtype)
    assert_close_rel(forward_backward(fused_bias_gelu.bias_gelu_impl, (h, bias)),
                     forward_backward(fused.bias_gelu_tanh, (h, bias)), rel)


# ------------------------------------------------------------------------- compiled, without code generation
def test_compiled_groups_work_under_megatron_recompute():
    """Each compiled group (dynamo graph + AOTAutograd forward/backward, run eagerly: "aot_eager") inside
    megatron's tensor_parallel.checkpoint - a no-grad first pass, then a recompute with grad - gives the
    eager definition's output and input/weight gradients."""
    cpu_emulation.apply_if_needed()
    mrandom.model_parallel_cuda_manual_seed(3, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    torch._dynamo.reset()
    compiled = fused.compiled_backend("aot_eager")
    for fn_of, tensors, needs_grad in group_inputs().values():
        expected = forward_backward(fn_of(fused.EAGER), tensors, needs_grad)
        assert_close_rel(forward_backward(fn_of(compiled), tensors, needs_grad, through_recompute=True),
                         expected, 1e-6)


def test_one_graph_per_grad_mode_for_all_lengths_and_batch_sizes():
    """Text lengths vary every batch and batch sizes per bucket: the compiled groups mark every dim but the
    last dynamic, so all of them share one graph per grad mode; a batch of 1 adds one (dynamo always
    specialises size 1). dynamic=False would compile once per length and give up after 8."""
    graphs = []

    def counting_compiler(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    backend = fused.compiled_backend(counting_compiler)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for seq, batch in ((5, 2), (7, 3), (12, 2), (31, 4)):
                x, shift, scale = (torch.randn(n, batch, HIDDEN, requires_grad=grad) for n in (seq, 1, 1))
                backend.layer_norm_modulate(x, shift, scale, EPS)
    assert len(graphs) == 2
    with torch.no_grad():
        x, shift, scale = (torch.randn(n, 1, HIDDEN) for n in (9, 1, 1))
        backend.layer_norm_modulate(x, shift, scale, EPS)
    assert len(graphs) == 3


def test_model_with_compiled_groups_matches_eager_model():
    """The wiring: the tiny MMDiT whose blocks call the compiled groups (aot_eager) gives the eager model's
    output and parameter gradients on a padded batch (each group gets the shapes the model really passes)."""
    cpu_emulation.apply_if_needed()
    diff = build_tiny_diffusers_transformer(seed=2)
    inputs = make_inputs(2, 4, 6, [7, 3], seed=4)
    results = []
    with single_process_model_parallel():
        mrandom.model_parallel_cuda_manual_seed(3, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
        torch._dynamo.reset()
        for backend in (fused.EAGER, fused.compiled_backend("aot_eager")):
            model = megatron_from_diffusers(diff).train()
            compiled = QwenImageMMDiT(model.config, block_spec=get_qwen_image_block_spec(fusion=backend))
            compiled.load_state_dict(model.state_dict())
            out = compiled(**inputs)
            out.square().mean().backward()
            # (the last block's text-stream MLP feeds nothing: no gradient)
            results.append([out.detach()] + [p.grad for p in compiled.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1]) > 1
    assert_close_rel(results[1], results[0], 1e-6)


# ------------------------------------------------------------------------------------ Inductor (C++ codegen)
@pytest.mark.slow
def test_inductor_groups_match_eager_forward_and_backward():
    """The production backend (Inductor; C++ kernels on CPU) against the eager definitions, fp32: outputs and
    the gradients of every input and of the RMSNorm weight."""
    torch._dynamo.reset()
    compiled = fused.select_fusion("compile", "cpu")
    for fn_of, tensors, needs_grad in group_inputs().values():
        assert_close_rel(forward_backward(fn_of(compiled), tensors, needs_grad),
                         forward_backward(fn_of(fused.EAGER), tensors, needs_grad), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)])
def test_triton_groups_match_eager_on_cuda(dtype, rel):
    """What the model runs on GPU (fusion=auto): Inductor's Triton kernels, forward and backward, and
    megatron's compiled bias-GELU. bf16: the fused kernels round once where eager rounds per op (<= 4 ulp)."""
    torch._dynamo.reset()
    compiled = fused.select_fusion("auto", "cuda")
    for fn_of, tensors, needs_grad in group_inputs(dtype).values():
        tensors = [t.cuda() for t in tensors]
        assert_close_rel(forward_backward(fn_of(compiled), tensors, needs_grad),
                         forward_backward(fn_of(fused.EAGER), tensors, needs_grad), rel)
    h, bias = (torch.randn(S, B, FFN, device="cuda") * 3).to(dtype), torch.randn(FFN, device="cuda").to(dtype)
    assert_close_rel(forward_backward(fused_bias_gelu.bias_gelu_impl, (h, bias)),
                     forward_backward(fused.bias_gelu_tanh, (h, bias)), rel)
