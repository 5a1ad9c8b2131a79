"""QwenImageMMDiT (TP=1, in-process) against diffusers' QwenImageTransformer2DModel, plus the weight mapping,
the configs, latent packing, activation recompute and the released model's parameter count."""
import pytest
import torch

from megatron_qwen_image.model import QwenImageConfig, QwenImageMMDiT, pack_latents, unpack_latents
from megatron_qwen_image.model.diffusers_mapping import (
    config_from_diffusers,
    diffusers_config_from,
    diffusers_to_megatron,
    megatron_shapes,
    megatron_to_diffusers,
    parameter_counts,
    tensor_mappings_for,
)
from tests.reference_models import (
    EDIT_PARITY_SHAPES,
    PARITY_SHAPES,
    TINY_DIFFUSERS_CONFIG,
    build_tiny_diffusers_transformer,
    diffusers_forward,
    make_edit_inputs,
    make_inputs,
    megatron_from_diffusers,
    rel_max_err,
    single_process_model_parallel,
)

TOL = 1e-5  # max |ours - diffusers| relative to max |diffusers|, fp32

@pytest.fixture(scope="module")
def mp_world():
    with single_process_model_parallel():
        yield


@pytest.fixture(scope="module")
def diff_model():
    return build_tiny_diffusers_transformer(seed=0)


def _mapped_grads(diff_model):
    """diffusers' parameter gradients in our layout (TP=1); None (unused, e.g. the last block's txt_mlp) -> 0."""
    grads = {n: _grad(p) for n, p in diff_model.named_parameters()}
    return diffusers_to_megatron(grads, 1, 0)


def _grad(p):
    return torch.zeros_like(p) if p.grad is None else p.grad.clone()


def _loss(out, seed=7):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return (out * weight).sum()


@pytest.mark.parametrize("batch,h,w,text_lens,frames", PARITY_SHAPES)
def test_forward_matches_diffusers(mp_world, diff_model, batch, h, w, text_lens, frames):
    model = megatron_from_diffusers(diff_model).eval()
    inputs = make_inputs(batch, h, w, text_lens, seed=h * 10 + w, frames=frames)
    with torch.no_grad():
        ref = diffusers_forward(diff_model, inputs)
        out = model(**inputs)
    assert out.shape == ref.shape == (batch, frames * h * w, 64)
    assert rel_max_err(out, ref) <= TOL


def test_bf16_forward_close_to_fp32_diffusers(mp_world, diff_model):
    """With bf16 parameters and activations (as trained on GPU) the output stays close to fp32 diffusers."""
    model = megatron_from_diffusers(diff_model).eval().bfloat16()
    inputs = make_inputs(2, 4, 6, [7, 3], seed=8)
    with torch.no_grad():
        ref = diffusers_forward(diff_model, inputs)
        out = model(**{k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v
                       for k, v in inputs.items()})
    assert out.dtype == torch.bfloat16
    assert rel_max_err(out.float(), ref) <= 5e-2


@pytest.mark.parametrize("images,text_len", [([(1, 4, 6)], 7), ([(1, 5, 3)], 4), ([(2, 3, 2)], 5),
                                             ([(1, 4, 4), (1, 2, 6)], 3)])
def test_msrope_matches_diffusers_qwen_embed_rope(images, text_len):
    """cos/sin of our MSRoPE equal the real/imaginary parts of diffusers' QwenEmbedRope frequencies."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    from megatron_qwen_image.model.rope import QwenMSRoPE

    axes = TINY_DIFFUSERS_CONFIG["axes_dims_rope"]
    ref_img, ref_txt = QwenEmbedRope(theta=10000, axes_dim=list(axes), scale_rope=True)(
        [images], max_txt_seq_len=text_len, device=torch.device("cpu"))
    img_cos, img_sin, txt_cos, txt_sin = QwenMSRoPE(axes)(images, text_len)
    for ours, ref in ((img_cos, ref_img.real), (img_sin, ref_img.imag), (txt_cos, ref_txt.real),
                      (txt_sin, ref_txt.imag)):
        assert ours.shape == ref.shape
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.gpu
def test_forward_and_backward_match_diffusers_on_cuda(mp_world):
    """On a GPU (no emulation, megatron's layers allocated on CUDA): fp32 parity without TF32, and bf16."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    diff = build_tiny_diffusers_transformer(seed=3)
    model = megatron_from_diffusers(diff, use_cpu_initialization=False)
    diff = diff.cuda()
    assert next(model.parameters()).is_cuda
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in make_inputs(2, 4, 6, [7, 3], seed=9).items()}
    out = model(**inputs)
    ref = diffusers_forward(diff, inputs)
    assert rel_max_err(out, ref) <= TOL
    _loss(out.cpu()).backward()
    _loss(ref.cpu()).backward()
    ref_grads = _mapped_grads(diff)
    for name, p in model.named_parameters():
        assert rel_max_err(_grad(p), ref_grads[name]) <= 1e-4, name
    with torch.no_grad():
        out_bf16 = model.bfloat16()(**{k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v
                                       for k, v in inputs.items()})
    assert rel_max_err(out_bf16.float(), ref) <= 5e-2


def test_img_shapes_in_pipeline_layout(mp_world, diff_model):
    """img_shapes as QwenImagePipeline passes them ([[(1, h, w)]] per sample) give the same output."""
    model = megatron_from_diffusers(diff_model).eval()
    inputs = make_inputs(2, 4, 6, [7, 3], seed=3)
    with torch.no_grad():
        a = model(**inputs)
        b = model(**{**inputs, "img_shapes": [[s] for s in inputs["img_shapes"]]})
    assert torch.equal(a, b)


def test_padding_is_masked(mp_world, diff_model):
    """Changing the features of padded text tokens changes nothing in the image output."""
    model = megatron_from_diffusers(diff_model).eval()
    inputs = make_inputs(2, 4, 6, [7, 3], seed=4)
    other = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    other["encoder_hidden_states"][1, 3:] = 5.0
    with torch.no_grad():
        assert torch.allclose(model(**inputs), model(**other), atol=1e-6, rtol=0)


def test_backward_matches_diffusers(mp_world):
    diff = build_tiny_diffusers_transformer(seed=1).train()
    model = megatron_from_diffusers(diff).train()
    inputs = make_inputs(2, 4, 6, [7, 3], seed=5)
    _loss(diffusers_forward(diff, inputs)).backward()
    _loss(model(**inputs)).backward()
    ref = _mapped_grads(diff)
    ours = {n: _grad(p) for n, p in model.named_parameters()}
    assert ours.keys() == ref.keys()
    for name in ref:
        assert rel_max_err(ours[name], ref[name]) <= 1e-4, name


@pytest.fixture(scope="module")
def edit_models():
    """diffusers models with the same random weights, without and with zero_cond_t (Edit-2511)."""
    return {zc: build_tiny_diffusers_transformer(seed=4, zero_cond_t=zc) for zc in (False, True)}


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["edit", "edit-2511"])
@pytest.mark.parametrize("batch,target,conds,text_lens", EDIT_PARITY_SHAPES)
def test_edit_forward_matches_diffusers(mp_world, edit_models, zero_cond_t, batch, target, conds, text_lens):
    """Condition tokens after the target's, MSRoPE frame index 1, 2 ... for them; with zero_cond_t their
    modulation at timestep 0. Every image token's output (condition tokens too) equals diffusers'."""
    diff = edit_models[zero_cond_t]
    model = megatron_from_diffusers(diff).eval()
    assert model.config.zero_cond_t is zero_cond_t
    inputs = make_edit_inputs(batch, target, conds, text_lens, seed=sum(target))
    with torch.no_grad():
        ref = diffusers_forward(diff, inputs)
        out = model(**inputs)
    assert out.shape == ref.shape == inputs["hidden_states"].shape
    assert rel_max_err(out, ref) <= TOL


def test_zero_cond_t_changes_the_output(mp_world, edit_models):
    """The parity above is not vacuous: the same weights with and without zero_cond_t give other outputs, on
    the target's tokens too; without condition images zero_cond_t changes nothing (as in diffusers)."""
    inputs = make_edit_inputs(2, (4, 6), [(3, 5)], [7, 3], seed=1)
    plain = make_inputs(2, 4, 6, [7, 3], seed=1)
    with torch.no_grad():
        a, b = (megatron_from_diffusers(edit_models[zc]).eval() for zc in (False, True))
        assert rel_max_err(a(**inputs)[:, :24], b(**inputs)[:, :24]) > 1e-2
        assert torch.equal(a(**plain), b(**plain))


@pytest.mark.parametrize("recompute", [{}, dict(recompute_granularity="selective",
                                                recompute_modules=["core_attn", "layernorm", "mlp"])],
                         ids=["no-recompute", "selective-all"])
def test_edit_backward_matches_diffusers(mp_world, cpu_emulation, edit_models, recompute):
    """zero_cond_t gradients (both timesteps' modulation) equal diffusers', with and without recompute."""
    diff = build_tiny_diffusers_transformer(seed=5, zero_cond_t=True).train()
    model = megatron_from_diffusers(diff, **recompute).train()
    inputs = make_edit_inputs(2, (4, 6), [(3, 5)], [7, 3], seed=2)
    _loss(diffusers_forward(diff, inputs)).backward()
    _loss(model(**inputs)).backward()
    ref = _mapped_grads(diff)
    for name, p in model.named_parameters():
        assert rel_max_err(_grad(p), ref[name]) <= 1e-4, name


def test_mapping_round_trip_bit_exact(mp_world, diff_model):
    sd = diff_model.state_dict()
    # diffusers -> ours (TP=1) -> diffusers, via a real model's state dict (with megatron's _extra_state keys)
    model = megatron_from_diffusers(diff_model)
    back = megatron_to_diffusers([model.state_dict()])
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # diffusers -> TP=2 and TP=4 shards -> diffusers
    for tp in (2, 4):
        shards = [diffusers_to_megatron(sd, tp, r) for r in range(tp)]
        back = megatron_to_diffusers(shards)
        assert back.keys() == sd.keys()
        assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_mapping_streams_one_entry_at_a_time(diff_model):
    """Each mapping entry converts from only its own diffusers tensors: diffusers -> shards -> diffusers."""
    sd = diff_model.state_dict()
    config = config_from_diffusers(dict(diff_model.config))
    shapes = megatron_shapes(config)
    mappings = tensor_mappings_for(config)
    assert sorted(n for mp in mappings for n in mp.diffusers) == sorted(sd)
    for mp in mappings:
        full = mp.to_megatron([sd[n] for n in mp.diffusers])
        assert tuple(full.shape) == shapes[mp.megatron], mp.megatron
        pieces = [mp.shard(full, 2, r) for r in range(2)]
        if mp.tp_axis is not None:
            assert pieces[0].shape[mp.tp_axis] * 2 == full.shape[mp.tp_axis]
        out = mp.to_diffusers(mp.unshard(pieces))
        assert all(torch.equal(out[n], sd[n]) for n in mp.diffusers)
        meta = mp.to_diffusers(torch.empty(shapes[mp.megatron], device="meta"))
        assert all(meta[n].shape == sd[n].shape for n in mp.diffusers)


def test_fused_qkv_layout_is_per_head(diff_model):
    """Rows of our fused q/k/v are [q_h; k_h; v_h] per head, so a contiguous TP split holds whole heads."""
    sd = diff_model.state_dict()
    ours = diffusers_to_megatron(sd, 1, 0)["layers.0.attention.img_qkv.weight"]
    hd = TINY_DIFFUSERS_CONFIG["attention_head_dim"]
    for h in range(TINY_DIFFUSERS_CONFIG["num_attention_heads"]):
        for i, x in enumerate("qkv"):
            rows = slice((3 * h + i) * hd, (3 * h + i + 1) * hd)
            assert torch.equal(ours[rows], sd[f"transformer_blocks.0.attn.to_{x}.weight"][h * hd:(h + 1) * hd])


def test_mapping_refuses_bad_input(diff_model):
    sd = dict(diff_model.state_dict())
    with pytest.raises(ValueError, match="tp_size"):
        diffusers_to_megatron(sd, 3, 0)
    sd["transformer_blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="unexpected"):
        diffusers_to_megatron(sd, 1, 0)
    with pytest.raises(KeyError, match="not a QwenImageTransformer2DModel"):
        diffusers_to_megatron({"foo": torch.zeros(1)}, 1, 0)
    shards = [diffusers_to_megatron(diff_model.state_dict(), 2, r) for r in range(2)]
    shards[1]["proj_out.bias"] = shards[1]["proj_out.bias"] + 1
    with pytest.raises(ValueError, match="proj_out.bias"):
        megatron_to_diffusers(shards)


def test_megatron_shapes_match_model(mp_world, diff_model):
    model = megatron_from_diffusers(diff_model)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert actual == megatron_shapes(model.config)
    counts = parameter_counts(model.config)
    assert counts["total"] == sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in diff_model.parameters())


def test_config_round_trip(diff_model):
    from diffusers import QwenImageTransformer2DModel

    config = config_from_diffusers({**dict(diff_model.config), "_class_name": "QwenImageTransformer2DModel",
                                    "_diffusers_version": "0.42.1"})
    assert (config.num_layers, config.hidden_size, config.num_attention_heads, config.kv_channels) == (2, 64, 4, 16)
    assert (config.ffn_hidden_size, config.joint_attention_dim, config.axes_dims_rope) == (256, 64, (4, 6, 6))
    kwargs = diffusers_config_from(config)
    rebuilt = QwenImageTransformer2DModel(**{k: v for k, v in kwargs.items() if not k.startswith("_")})
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {
        k: tuple(v.shape) for k, v in diff_model.state_dict().items()}
    assert diffusers_config_from(config_from_diffusers(kwargs)) == kwargs
    # Edit-2511: zero_cond_t is read and written back
    edit = config_from_diffusers({**TINY_DIFFUSERS_CONFIG, "zero_cond_t": True})
    assert edit.zero_cond_t is True and diffusers_config_from(edit)["zero_cond_t"] is True
    # released defaults
    released = config_from_diffusers({})
    assert released.zero_cond_t is False
    assert (released.num_layers, released.hidden_size, released.ffn_hidden_size) == (60, 3072, 12288)


@pytest.mark.parametrize("bad,match", [
    ({"_class_name": "FluxTransformer2DModel"}, "_class_name"),
    ({"zero_cond_t": "yes"}, "zero_cond_t"),
    ({"use_additional_t_cond": True}, "use_additional_t_cond"),
    ({"use_layer3d_rope": True}, "use_layer3d_rope"),
    ({"num_heads": 4}, "unknown keys"),
])
def test_config_from_diffusers_refuses(bad, match):
    with pytest.raises(ValueError, match=match):
        config_from_diffusers({**TINY_DIFFUSERS_CONFIG, **bad})


@pytest.mark.parametrize("kwargs,match", [
    (dict(tensor_model_parallel_size=3), "num_attention_heads"),
    (dict(axes_dims_rope=(4, 6, 8)), "axes_dims_rope"),
    (dict(sequence_parallel=True, tensor_model_parallel_size=1), "sequence_parallel"),
    (dict(recompute_granularity="selective", recompute_modules=["moe"]), "recompute_modules"),
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=5), "recompute_num_layers"),
])
def test_config_refuses_bad_values(kwargs, match):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=(4, 6, 6))
    with pytest.raises(ValueError, match=match):
        QwenImageConfig(**{**base, **kwargs})


def test_forward_refuses_mismatched_shapes(mp_world, diff_model):
    model = megatron_from_diffusers(diff_model)
    inputs = make_inputs(2, 4, 6, [7, 3])
    with pytest.raises(ValueError, match="img_shapes"):
        model(**{**inputs, "img_shapes": [(1, 4, 5)] * 2})
    with pytest.raises(ValueError, match="same for every sample"):
        model(**{**inputs, "img_shapes": [(1, 4, 6), (1, 6, 4)]})


def test_pack_unpack_match_pipeline():
    from diffusers import QwenImagePipeline

    z = torch.randn(2, 16, 6, 10)
    packed = pack_latents(z)
    assert torch.equal(packed, QwenImagePipeline._pack_latents(z, 2, 16, 6, 10))
    assert packed.shape == (2, 15, 64)
    # channel = c * 4 + dy * 2 + dx
    assert packed[0, 1 * 5 + 2, 3 * 4 + 1 * 2 + 0] == z[0, 3, 2 * 1 + 1, 2 * 2 + 0]
    unpacked = unpack_latents(packed, 6, 10)
    assert torch.equal(unpacked, QwenImagePipeline._unpack_latents(packed, 6 * 8, 10 * 8, 8)[:, :, 0])
    assert torch.equal(unpacked, z)


# ------------------------------------------------------------------ activation recompute
RECOMPUTE = [  # (config overrides, tensor_parallel.checkpoint calls in one forward of the 3-block model)
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1), 3),
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2), 2),  # chunks 2 + 1
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2), 2),
    (dict(recompute_granularity="selective"), 3),  # megatron's default recompute_modules: ['core_attn']
    # per block: core_attn 1 + layernorm 4 (2 streams x 2 halves) + mlp 2
    (dict(recompute_granularity="selective", recompute_modules=["core_attn", "layernorm", "mlp"]), 21),
]


@pytest.fixture(scope="module")
def cpu_emulation():
    """megatron's tensor_parallel.checkpoint saves/restores CUDA RNG state: on CPU it needs the emulation."""
    try:
        from megatron_qwen_image import cpu_emulation as emulation
    except ImportError as e:
        pytest.skip(f"megatron_qwen_image.cpu_emulation not available ({e})")
    emulation.apply_if_needed()


def _forward_backward_measured(model, inputs, monkeypatch):
    """(output, grads, checkpoint calls, bytes autograd saved for backward) of one training step."""
    from megatron.core import tensor_parallel

    calls = []
    real = tensor_parallel.checkpoint

    def counting(function, distribute, *args):
        calls.append(function)
        return real(function, distribute, *args)

    monkeypatch.setattr(tensor_parallel, "checkpoint", counting)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
        n_saved = sum(saved)
    _loss(out).backward()
    monkeypatch.setattr(tensor_parallel, "checkpoint", real)
    return out.detach(), {n: _grad(p) for n, p in model.named_parameters()}, len(calls), n_saved


@pytest.mark.parametrize("recompute,n_checkpoints", RECOMPUTE, ids=lambda r: "-".join(
    str(v) if not isinstance(v, list) else "+".join(v) for v in r.values()) if isinstance(r, dict) else str(r))
def test_recompute_matches_no_recompute(mp_world, cpu_emulation, monkeypatch, recompute, n_checkpoints):
    """Same outputs and gradients with recompute as without; recompute really runs (megatron's checkpoint is
    called as often as the config says) and autograd keeps fewer bytes for backward."""
    diff = build_tiny_diffusers_transformer(seed=2, num_layers=3)
    inputs = make_inputs(2, 8, 6, [7, 3], seed=6)
    out0, grads0, calls0, saved0 = _forward_backward_measured(megatron_from_diffusers(diff).train(), inputs,
                                                              monkeypatch)
    out1, grads1, calls1, saved1 = _forward_backward_measured(
        megatron_from_diffusers(diff, **recompute).train(), inputs, monkeypatch)
    assert (calls0, calls1) == (0, n_checkpoints)
    assert saved1 < saved0
    assert rel_max_err(out1, out0) <= 1e-6
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        assert rel_max_err(grads1[name], grads0[name]) <= 1e-6, name


# ------------------------------------------------------------------ released size (meta device)
def test_released_size_parameter_count_on_meta(mp_world):
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        diff = QwenImageTransformer2DModel()
        ours = QwenImageMMDiT(QwenImageConfig(use_cpu_initialization=True, perform_initialization=False))
    n_diff = sum(p.numel() for p in diff.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == n_diff == parameter_counts(ours.config)["total"]
    assert round(n_ours / 1e9, 2) == 20.43
    # the modulation projections are a third of the model, and they are sharded
    n_mod = sum(p.numel() for n, p in ours.named_parameters() if "_mod." in n)
    assert 0.33 < n_mod / n_ours < 0.34
    tp4 = parameter_counts(ours.config, tp_size=4)
    assert tp4["replicated"] < 0.005 * n_ours
    assert tp4["per_rank"] == tp4["sharded"] // 4 + tp4["replicated"]
