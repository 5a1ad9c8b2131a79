"""backends.py: the block's layer implementations are chosen once, like megatron's gpt_layer_specs: the local
spec here (no Transformer Engine), TE's linears and attention where TE imports on a CUDA device (faked by
patching megatron's own probe, extensions.transformer_engine.HAVE_TE, and its classes), and the TE attention
adapter keeps SDPACoreAttention's contract."""
import pytest
import torch
import torch.nn.functional as F
from megatron.core.extensions import transformer_engine as te_ext
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_qwen_image.model import backends
from megatron_qwen_image.model.attention import SDPACoreAttention
from megatron_qwen_image.model.block import get_qwen_image_block_spec
from megatron_qwen_image.model.config import QwenImageConfig
from megatron_qwen_image.model.layers import HeadRMSNorm


class FakeTEColumnParallelLinear:
    pass


class FakeTERowParallelLinear:
    pass


class FakeTEDotProductAttention(torch.nn.Module):
    """TE's DotProductAttention contract as megatron's TEDotProductAttention wraps it: q/k/v [s, b, h, d]
    ("sbhd") -> [s, b, h * d]; attention_mask [b, 1, 1, s] bool, True = padding, for queries and keys alike.
    Padded query rows are left as NaN, the worst TE could leave there."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type):
        super().__init__()
        self.init_args = (layer_number, attn_mask_type, attention_type)
        self.calls = []

    def forward(self, q, k, v, attention_mask, attn_mask_type):
        self.calls.append(attn_mask_type)
        keep = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), attn_mask=keep)
        out = out.permute(2, 0, 1, 3).flatten(2)
        if attention_mask is not None:
            out = out.masked_fill(attention_mask[:, 0, 0, :].t()[:, :, None], float("nan"))
        return out


@pytest.fixture
def fake_te(monkeypatch):
    """Transformer Engine 'installed': megatron's probe says so and its wrapper classes are stubs."""
    monkeypatch.setattr(te_ext, "HAVE_TE", True)
    monkeypatch.setattr(te_ext, "TEColumnParallelLinear", FakeTEColumnParallelLinear)
    monkeypatch.setattr(te_ext, "TERowParallelLinear", FakeTERowParallelLinear)
    monkeypatch.setattr(te_ext, "TEDotProductAttention", FakeTEDotProductAttention)


def tiny_config():
    return QwenImageConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                           joint_attention_dim=16, axes_dims_rope=(4, 6, 6))


def test_local_spec_here_without_transformer_engine():
    assert not backends.transformer_engine_available()  # TE cannot be installed on this machine
    choice = backends.block_spec_backend()
    assert choice.name == "local" and "not importable" in choice.reason
    assert choice.spec_kwargs() == {"column_parallel_linear": ColumnParallelLinear,
                                    "row_parallel_linear": RowParallelLinear, "qk_norm": HeadRMSNorm,
                                    "core_attention": SDPACoreAttention}
    assert choice.fused_adam is False  # neither TE nor apex: megatron falls back to torch's AdamW
    assert isinstance(get_qwen_image_block_spec(**choice.spec_kwargs()), ModuleSpec)


def test_auto_takes_transformer_engine_on_cuda(fake_te):
    choice = backends.block_spec_backend("auto", device_type="cuda")
    assert choice.name == "transformer_engine"
    assert choice.spec_kwargs() == {"column_parallel_linear": FakeTEColumnParallelLinear,
                                    "row_parallel_linear": FakeTERowParallelLinear,
                                    "qk_norm": HeadRMSNorm,  # keeps the TP all-reduce of its weight gradient
                                    "core_attention": backends.TEJointCoreAttention}
    assert backends.block_spec_backend("transformer_engine", device_type="cuda").name == "transformer_engine"


def test_local_when_asked_or_without_cuda(fake_te):
    assert backends.block_spec_backend("local", device_type="cuda").name == "local"
    on_cpu = backends.block_spec_backend("auto", device_type="cpu")
    assert on_cpu.name == "local" and "CUDA" in on_cpu.reason


def test_refusals_name_the_setting():
    with pytest.raises(ValueError, match="transformer_impl=transformer_engine: transformer_engine is not importable"):
        backends.block_spec_backend("transformer_engine", device_type="cuda")
    with pytest.raises(ValueError, match="transformer_impl must be one of"):
        backends.block_spec_backend("te")


def test_te_attention_adapter_keeps_the_sdpa_contract(fake_te):
    """[image, text] right-padded joint sequences: TE's padding mask gives SDPACoreAttention's output, zeros
    past each valid prefix included (written by the adapter, whatever TE leaves there)."""
    config = tiny_config()
    adapter, reference = backends.TEJointCoreAttention(config), SDPACoreAttention(config)
    assert adapter.dpa.init_args == (1, AttnMaskType.padding, "self")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, 3, 2, 16, generator=g) for _ in range(3))  # [S, B, H, D]
    for valid in ([9, 6, 4], None):
        out = adapter(q, k, v, valid)
        torch.testing.assert_close(out, reference(q, k, v, valid), rtol=1e-6, atol=1e-6)
    assert adapter.dpa.calls == [AttnMaskType.padding, AttnMaskType.no_mask]
    assert out.shape == (9, 3, 32)
