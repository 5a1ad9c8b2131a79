"""python -m megatron_qwen_image.convert: diffusers QwenImageTransformer2DModel <-> megatron-qwen-image checkpoint.

References: a tiny random diffusers model saved with save_pretrained (sharded safetensors + index, as
released); diffusers' own from_pretrained and forward; megatron-core's dist_checkpointing loader and our
model's sharded_state_dict.
"""
import glob
import json
import os

import pytest
import torch

from megatron_qwen_image.convert.__main__ import main as convert_main
from megatron_qwen_image.convert.diffusers_dir import ConversionError
from megatron_qwen_image.convert.exporter import export_diffusers
from megatron_qwen_image.convert.importer import import_diffusers
from tests.reference_models import (PARITY_SHAPES, build_tiny_diffusers_transformer, diffusers_forward, make_inputs,
                                    megatron_from_diffusers, rel_max_err, single_process_model_parallel)
from tests.torchrun import torchrun


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny diffusers transformer directory in the released layout (several safetensors shards + index)."""
    path = tmp_path_factory.mktemp("released") / "transformer"
    model = build_tiny_diffusers_transformer(seed=3)
    model.save_pretrained(str(path), max_shard_size="200KB")
    assert len(glob.glob(str(path / "*.safetensors"))) > 1 and (path / "diffusion_pytorch_model.safetensors.index.json").exists()
    return path


def _state_dict(path):
    """Every tensor of a diffusers directory as stored (dtype included), read with safetensors."""
    from safetensors.torch import load_file

    out = {}
    for file in glob.glob(str(path / "*.safetensors")):
        out.update(load_file(file))
    return out


def _diffusers_model(path):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(str(path)).eval()


def _assert_bit_exact(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_is_bit_exact(released, tmp_path, tp):
    ckpt, out = tmp_path / "ckpt", tmp_path / "exported"
    assert convert_main(["import-diffusers", "--src", str(released), "--dst", str(ckpt), "--tp", str(tp), "--quiet"]) == 0
    assert convert_main(["export-diffusers", "--src", str(ckpt), "--dst", str(out), "--max-shard-size", "300KB",
                         "--quiet"]) == 0
    _assert_bit_exact(_state_dict(released), _state_dict(out))
    _assert_bit_exact(_diffusers_model(released).state_dict(), _diffusers_model(out).state_dict())
    ref_cfg, out_cfg = (json.load(open(p / "config.json")) for p in (released, out))
    assert {k: v for k, v in ref_cfg.items() if not k.startswith("_")} == \
        {k: v for k, v in out_cfg.items() if not k.startswith("_")}
    assert (out / "diffusion_pytorch_model.safetensors.index.json").exists()


def test_edit_2511_round_trip_is_bit_exact(tmp_path):
    """An Edit-2511-shaped transformer (zero_cond_t: true) imports, loads with zero_cond_t, gives diffusers'
    outputs on edit inputs, and exports bit-exactly with its config (zero_cond_t included)."""
    from consumer.checkpointing import load_model_weights
    from megatron_qwen_image.model import QwenImageMMDiT
    from megatron_qwen_image.model.diffusers_mapping import config_from_diffusers
    from tests.reference_models import make_edit_inputs

    src, ckpt, out = tmp_path / "edit2511", tmp_path / "ckpt", tmp_path / "exported"
    reference = build_tiny_diffusers_transformer(seed=6, zero_cond_t=True)
    reference.save_pretrained(str(src), max_shard_size="200KB")
    import_diffusers(str(src), str(ckpt), tp=2, progress=False)
    export_diffusers(str(ckpt), str(out), progress=False)
    _assert_bit_exact(_state_dict(src), _state_dict(out))
    assert json.load(open(out / "config.json"))["zero_cond_t"] is True
    assert _diffusers_model(out).config.zero_cond_t is True
    with single_process_model_parallel():
        model = QwenImageMMDiT(config_from_diffusers(json.load(open(src / "config.json")), perform_initialization=False))
        assert model.config.zero_cond_t is True
        load_model_weights(model, str(ckpt))
        inputs = make_edit_inputs(2, (4, 6), [(3, 5)], [7, 3], seed=3)
        with torch.no_grad():
            assert rel_max_err(model(**inputs), diffusers_forward(reference, inputs)) <= 1e-5
        # a model configured without zero_cond_t does not load it silently (it would modulate the sources wrongly)
        plain = QwenImageMMDiT(config_from_diffusers({**json.load(open(src / "config.json")), "zero_cond_t": False},
                                                     perform_initialization=False))
        with pytest.raises(ValueError, match="zero_cond_t"):
            load_model_weights(plain, str(ckpt))


def test_bf16_weights_stay_bf16_and_round_trip(tmp_path):
    src, ckpt, out = tmp_path / "bf16", tmp_path / "ckpt", tmp_path / "exported"
    build_tiny_diffusers_transformer(seed=4).to(torch.bfloat16).save_pretrained(str(src))  # one file, no index
    import_diffusers(str(src), str(ckpt), tp=4, progress=False)
    export_diffusers(str(ckpt), str(out), progress=False)
    sd = _state_dict(out)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    _assert_bit_exact(_state_dict(src), sd)
    assert os.listdir(out).count("diffusion_pytorch_model.safetensors") == 1


def test_imported_checkpoint_is_what_the_model_loads(released, tmp_path):
    """Keys of the converted checkpoint == the model's sharded_state_dict keys (tensors and megatron's
    _extra_state objects); loading it with dist_checkpointing at TP=1 gives diffusers' outputs."""
    from megatron.core.dist_checkpointing import load_tensors_metadata
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader

    from consumer.checkpointing import load_model_weights, model_sharded_state_dict
    from megatron_qwen_image.model import QwenImageMMDiT
    from megatron_qwen_image.model.diffusers_mapping import config_from_diffusers

    ckpt = tmp_path / "ckpt"
    import_diffusers(str(released), str(ckpt), tp=2, progress=False)
    reference = build_tiny_diffusers_transformer(seed=3)
    with single_process_model_parallel():
        config = config_from_diffusers(dict(reference.config), tensor_model_parallel_size=1)
        model = QwenImageMMDiT(config)  # random init
        sd = model_sharded_state_dict(model)
        want_tensors = {v.key for v in sd.values() if isinstance(v, ShardedTensor)}
        want_objects = {v.unique_key for v in sd.values() if isinstance(v, ShardedObject)}
        stored = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        assert set(load_tensors_metadata(str(ckpt))) == want_tensors
        assert set(stored) == want_tensors | want_objects
        load_model_weights(model, str(ckpt))
        with torch.no_grad():
            for i, (batch, h, w, lens, frames) in enumerate(PARITY_SHAPES[:3]):
                inputs = make_inputs(batch, h, w, lens, seed=i, frames=frames)
                assert rel_max_err(model(**inputs), diffusers_forward(reference, inputs)) <= 1e-5
        # and bit-for-bit the same weights as the in-memory mapping gives
        direct = megatron_from_diffusers(reference).state_dict()
        for k, v in model.state_dict().items():
            if torch.is_tensor(v):
                assert torch.equal(v, direct[k]), k


@pytest.mark.slow
def test_pretrained_import_at_tp2_gives_diffusers_outputs(released, tmp_path):
    """The train loop's --pretrained path at TP=2 (2 processes) with the imported weights: fp32 outputs equal
    diffusers' (<= 1e-5 relative) on non-square grids, padded text and 2 frames."""
    ckpt = tmp_path / "ckpt"
    import_diffusers(str(released), str(ckpt), tp=2, progress=False)
    prefix = str(tmp_path / "parity")
    torchrun(2, ["tests/dist/ckpt_convert_worker.py", "--ckpt", str(ckpt), "--diffusers", str(released),
                 "--out", prefix], timeout=300)
    results = [json.load(open(p)) for p in sorted(glob.glob(prefix + ".rank*.json"))]
    assert len(results) == 2
    for r in results:
        assert r["tp"] == 2 and r["step"] == 0  # weights only: the run starts at step 0
        assert len(r["errors"]) == len(PARITY_SHAPES) and max(r["errors"]) <= 1e-5, r["errors"]


# ------------------------------------------------------------------------------------------------ errors
def test_refuses_a_directory_that_is_not_a_qwen_image_transformer(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        import_diffusers(str(tmp_path), str(tmp_path / "out"), progress=False)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ConversionError, match="not a Qwen-Image transformer.*UNet2DConditionModel"):
        import_diffusers(str(tmp_path), str(tmp_path / "out"), progress=False)


def test_refuses_mismatched_shapes(released, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(released, bad)
    index = json.load(open(bad / "diffusion_pytorch_model.safetensors.index.json"))
    name = "transformer_blocks.1.attn.to_k.weight"
    file = bad / index["weight_map"][name]
    tensors = load_file(str(file))
    tensors[name] = tensors[name][:, :32].contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"mismatched shapes: transformer_blocks\.1\.attn\.to_k\.weight: "
                                              r"\(64, 32\).*config implies \(64, 64\)"):
        import_diffusers(str(bad), str(tmp_path / "out"), progress=False)
    del tensors[name]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing tensors \['transformer_blocks\.1\.attn\.to_k\.weight'\]"):
        import_diffusers(str(bad), str(tmp_path / "out"), progress=False)


def test_refuses_tp_not_dividing_heads_and_a_used_destination(released, tmp_path, capsys):
    assert convert_main(["import-diffusers", "--src", str(released), "--dst", str(tmp_path / "x"), "--tp", "3"]) == 2
    assert "--tp 3 does not divide num_attention_heads=4" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "f").write_text("x")
    with pytest.raises(ConversionError, match="exists and is not an empty directory"):
        import_diffusers(str(released), str(tmp_path / "used"), progress=False)
    assert convert_main(["export-diffusers", "--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "y")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
