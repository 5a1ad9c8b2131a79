"""Edit sampling (megatron_qwen_image.sampling with condition latents) against diffusers' QwenImageEditPipeline.

Reference: QwenImageEditPipeline built from the tiny encoders of make_tiny and a tiny random
QwenImageTransformer2DModel (Edit-2511's zero_cond_t on, so the condition tokens' timestep-0 modulation is
exercised); our sampler runs our MMDiT holding the same weights, with our edit encoders' features and condition
latents of the same source image, the same seed, steps and true_cfg_scale. For speed the pipeline's condition
area (a literal 1024*1024 in its __call__) is patched small, as our template's area is.
"""
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_mod
from PIL import Image

from megatron_qwen_image.encoders.edit import EDIT, QwenEditConditionEncoder, QwenEditTextEncoder, load_processor
from megatron_qwen_image.encoders.vae import QwenVAEEncoder
from megatron_qwen_image.sampling import SampleRequest, generate
from tests.reference_models import build_tiny_diffusers_transformer, megatron_from_diffusers, rel_max_err
from tests.reference_models import single_process_model_parallel

AREA = 96 * 96
TEMPLATE = dataclasses.replace(EDIT, vae_area=AREA)
WIDTH, HEIGHT = 64, 48


@pytest.fixture(scope="module")
def parts(pipe, tiny_dir):
    diff = build_tiny_diffusers_transformer(seed=11, zero_cond_t=True)
    edit_pipe = QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), vae=pipe.vae,
        text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, processor=load_processor(tiny_dir), transformer=diff)
    edit_pipe.set_progress_bar_config(disable=True)
    text = QwenEditTextEncoder(pipe.text_encoder, load_processor(tiny_dir), TEMPLATE)
    cond = QwenEditConditionEncoder(QwenVAEEncoder(pipe.vae), TEMPLATE)
    return edit_pipe, diff, text, cond


@pytest.mark.parametrize("negative,guidance", [(None, 1.0), ("blurry", 4.0)], ids=["no-guidance", "true-cfg"])
def test_edit_sampler_equals_the_edit_pipeline(parts, monkeypatch, negative, guidance):
    edit_pipe, diff, text, cond = parts
    real = edit_mod.calculate_dimensions
    monkeypatch.setattr(edit_mod, "calculate_dimensions", lambda area, ratio: real(AREA, ratio))
    source = Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 150, 3), dtype=np.uint8))
    instruction, steps, seed = "Make the sign red.", 3, 7
    ref = edit_pipe(image=source, prompt=instruction, negative_prompt=negative, true_cfg_scale=guidance,
                    num_inference_steps=steps, height=HEIGHT, width=WIDTH, output_type="latent",
                    generator=torch.Generator().manual_seed(seed)).images
    (embeds,) = text.encode([instruction], [source])
    neg = text.encode([negative], [source])[0] if negative else None
    request = SampleRequest(embeds, WIDTH, HEIGHT, seed, neg, cond_latents=tuple(cond.encode([source])))
    with single_process_model_parallel(), torch.no_grad():
        model = megatron_from_diffusers(diff).eval()
        [ours] = generate(model, [request], steps, guidance, torch.device("cpu"), torch.float32)
    assert ours.shape == ref[0].shape == ((HEIGHT // 16) * (WIDTH // 16), 64)
    assert rel_max_err(ours, ref[0]) <= 1e-4
    # and the condition matters: another source image gives another result
    other = SampleRequest(embeds, WIDTH, HEIGHT, seed, neg, cond_latents=tuple(cond.encode([source.rotate(90)])))
    with single_process_model_parallel(), torch.no_grad():
        [moved] = generate(megatron_from_diffusers(diff).eval(), [other], steps, guidance, torch.device("cpu"),
                           torch.float32)
    assert rel_max_err(moved, ref[0]) > 1e-3


def test_edit_prompts_file_round_trip(parts, tiny_dir, tmp_path):
    """A prompts file with an edit entry (`image:`, relative to the file): sized as the edit pipeline sizes its
    output, encoded with the source in the prompt and its latents, saved and loaded back exactly."""
    from megatron_qwen_image.cache.buckets import condition_size
    from megatron_qwen_image.prompts import PromptsFileError, load_encoded, main as prompts_main, read_prompts_file

    _, _, text, cond = parts
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (60, 100, 3), dtype=np.uint8)).save(tmp_path / "src.png")
    (tmp_path / "prompts.yaml").write_text('- "a plain text-to-image prompt"\n'
                                           '- {prompt: "Make it blue.", image: src.png, negative_prompt: " "}\n')
    specs = read_prompts_file(str(tmp_path / "prompts.yaml"), 64, 64, condition_area=AREA)
    assert specs[0].images == () and (specs[0].width, specs[0].height) == (64, 64)
    assert specs[1].images == (str(tmp_path / "src.png"),)
    assert (specs[1].width, specs[1].height) == condition_size(100, 60, AREA)
    out = tmp_path / "prompts.safetensors"
    assert prompts_main(["encode", str(tmp_path / "prompts.yaml"), "--encoders", tiny_dir, "--out", str(out),
                         "--width", "64", "--height", "64", "--condition-area", str(AREA)]) == 0
    encoded = load_encoded(str(out))
    plain, edit = encoded.prompts
    assert plain.cond_latents == () and encoded.info["edit_template"] == "edit"
    source = Image.open(tmp_path / "src.png").convert("RGB")
    assert torch.equal(edit.embeds, text.encode(["Make it blue."], [source])[0])
    assert torch.equal(edit.negative_embeds, text.encode([" "], [source])[0])
    [want] = cond.encode([source])
    assert len(edit.cond_latents) == 1 and torch.equal(edit.cond_latents[0], want)
    assert SampleRequest.from_prompt(edit).cond_shapes == (tuple(want.shape),)
    (tmp_path / "bad.yaml").write_text('- {prompt: "x", image: missing.png}\n')
    with pytest.raises(PromptsFileError, match=r"bad.yaml, item 0: source image .*missing.png not found"):
        read_prompts_file(str(tmp_path / "bad.yaml"))


def test_sample_command_edits_as_the_pipeline(parts, monkeypatch, tiny_dir, tmp_path, capsys):
    """`python -m consumer.sample --image SRC` on an imported Edit-2511-shaped checkpoint: the final latents
    equal QwenImageEditPipeline's on the exported weights for the same seed; refusals are one line."""
    from consumer.sample import main as sample_main
    from megatron_qwen_image.convert.importer import import_diffusers

    edit_pipe, diff, _, _ = parts
    diff.save_pretrained(str(tmp_path / "transformer"))
    import_diffusers(str(tmp_path / "transformer"), str(tmp_path / "ckpt"), progress=False)
    source = Image.fromarray(np.random.default_rng(5).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    source.save(tmp_path / "src.png")
    args = ["--pretrained", str(tmp_path / "ckpt"), "--encoders", tiny_dir, "--image", str(tmp_path / "src.png"),
            "--prompt", "Make the sign red.", "--steps", "2", "--width", str(WIDTH), "--height", str(HEIGHT),
            "--condition-area", str(AREA), "--seed", "3", "--guidance", "1", "--save-latents", "--out",
            str(tmp_path / "out")]
    assert sample_main(args) == 0
    [ours] = torch.load(tmp_path / "out" / "latents.pt")
    real = edit_mod.calculate_dimensions
    monkeypatch.setattr(edit_mod, "calculate_dimensions", lambda area, ratio: real(AREA, ratio))
    ref = edit_pipe(image=source, prompt="Make the sign red.", true_cfg_scale=1.0, num_inference_steps=2,
                    height=HEIGHT, width=WIDTH, output_type="latent", generator=torch.Generator().manual_seed(3)).images
    assert rel_max_err(ours, ref[0]) <= 1e-4
    assert (tmp_path / "out" / "grid.png").exists()
    import json
    [line] = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert json.loads(line)["images"] == [str(tmp_path / "src.png")]
    capsys.readouterr()
    assert sample_main(args[:6] + ["--image", str(tmp_path / "src.png"), "--prompt", "p"]) == 2
    assert capsys.readouterr().err.strip() == "error: 2 --image sources need --edit-template edit_plus (the edit " \
                                              "template takes one)"
    assert sample_main(args[:4] + ["--image", str(tmp_path / "nope.png"), "--prompt", "p"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --image {tmp_path / 'nope.png'}: no such file"
