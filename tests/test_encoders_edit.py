"""Image-editing encoders vs. diffusers' own QwenImageEditPipeline and QwenImageEditPlusPipeline, on the tiny
random models of make_tiny (the pipelines are built from those parts: there is no edit model_index.json).

The references are the pipelines' code: `encode_prompt` for features, and whole `__call__`s (one step, latent
output) whose `encode_prompt` / `prepare_latents` results we capture, so the pipelines' own sizing, resizing and
VAE preprocessing are what we compare with. For speed the condition areas are made small: the area is a field of
our templates, and in the pipelines we patch the module constant (Plus) or `calculate_dimensions` (Edit, where
1024*1024 is a literal); the 1024*1024 defaults are compared by size only.
"""
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_mod
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_mod
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from megatron_qwen_image.encoders.edit import (EDIT, EDIT_PLUS, EditTemplate, QwenEditConditionEncoder,
                                               QwenEditTextEncoder, condition_size, edit_drop_index, load_processor)
from megatron_qwen_image.encoders.local_dir import EncoderDirError
from megatron_qwen_image.encoders.make_tiny import TEXT_HIDDEN, Z_DIM
from megatron_qwen_image.encoders.vae import QwenVAEEncoder
from megatron_qwen_image.model.packing import pack_latents

INSTRUCTIONS = [
    "Make the cat blue.",
    "把背景换成夜晚的城市。",
    "Add a poster that reads \"OPEN DAILY / Fresh Coffee\" in dark blue letters on the left wall, and make the sky "
    "above the street a bright morning gradient.",
    "hello",
]
SIZES = [(200, 120), (90, 160), (128, 128), (300, 100)]  # condition images (w, h): four aspect ratios
EDIT_AREA = 128 * 128  # test VAE area for Edit (its vision tower sees the same image)
PLUS_VISION_AREA, PLUS_VAE_AREA = 96 * 96, 128 * 128
SMALL_EDIT = dataclasses.replace(EDIT, vae_area=EDIT_AREA)
SMALL_PLUS = dataclasses.replace(EDIT_PLUS, vision_area=PLUS_VISION_AREA, vae_area=PLUS_VAE_AREA)


def _image(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


IMAGES = [_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return load_processor(tiny_dir)


def _edit_pipeline(cls, pipe, processor):
    # A scheduler of its own: __call__ sets its timesteps, and `pipe` is shared across test modules.
    return cls(scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), vae=pipe.vae,
               text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, processor=processor,
               transformer=pipe.transformer)


@pytest.fixture(scope="module")
def edit_pipe(pipe, processor):
    return _edit_pipeline(QwenImageEditPipeline, pipe, processor)


@pytest.fixture(scope="module")
def plus_pipe(pipe, processor):
    return _edit_pipeline(QwenImageEditPlusPipeline, pipe, processor)


def _run_and_capture(pipeline, monkeypatch, **call_kwargs):
    """Run the pipeline's __call__ for one step and return what its encode_prompt and prepare_latents returned."""
    seen = {}

    def capture(name):
        original = getattr(pipeline, name)

        def wrapper(*args, **kwargs):
            seen[name] = original(*args, **kwargs)
            return seen[name]
        monkeypatch.setattr(pipeline, name, wrapper)

    capture("encode_prompt")
    capture("prepare_latents")
    # height/width: a small output (noise) latent; the condition sizes come from the images as in real use.
    pipeline(num_inference_steps=1, output_type="latent", true_cfg_scale=1.0, height=64, width=64, **call_kwargs)
    (embeds, mask), (_, image_latents) = seen["encode_prompt"], seen["prepare_latents"]
    assert mask is None, "one prompt: the pipeline drops an all-ones mask"
    return embeds, image_latents


def test_templates_and_areas_are_the_pipelines(edit_pipe, plus_pipe):
    assert EDIT.template == edit_pipe.prompt_template_encode
    assert EDIT_PLUS.template == plus_pipe.prompt_template_encode
    assert EDIT.vae_area == EDIT_PLUS.vae_area == plus_mod.VAE_IMAGE_SIZE == 1024 * 1024
    assert EDIT.vision_area is None and EDIT_PLUS.vision_area == plus_mod.CONDITION_IMAGE_SIZE == 384 * 384
    with pytest.raises(ValueError, match="exactly one condition image"):
        EDIT.format("x", 2)
    with pytest.raises(ValueError, match="at least one"):
        EDIT_PLUS.format("x", 0)


def test_drop_index_matches_pipelines(edit_pipe, plus_pipe, processor):
    # Computed from the tokenizer (the tiny vocabulary holds each template word whole, as the real one does).
    for tok in (processor.tokenizer, edit_pipe.tokenizer):
        assert edit_drop_index(tok, EDIT) == edit_pipe.prompt_template_encode_start_idx == 64
        assert edit_drop_index(tok, EDIT_PLUS) == plus_pipe.prompt_template_encode_start_idx == 64
    # A prefix that ends inside a word ("Pic" + "ture 1: ...") is not a stable token prefix.
    bad = EditTemplate("bad", "<|im_start|>user\nPic{}<|im_end|>", vision_area=None,
                       image_prompt="ture {}: <|vision_start|><|image_pad|><|vision_end|>")
    with pytest.raises(ValueError, match="stable prefix"):
        edit_drop_index(processor.tokenizer, bad)


def test_condition_size_equals_calculate_dimensions():
    sizes = [(1024, 1024), (1920, 1080), (1080, 1920), (640, 480), (333, 777), (4000, 300), (50, 50), (170, 1013)]
    for w, h in sizes:
        assert condition_size(w, h) == edit_mod.calculate_dimensions(1024 * 1024, w / h)[:2]  # the default area
        for area in (1024 * 1024, 384 * 384, EDIT_AREA, PLUS_VISION_AREA):
            ref = plus_mod.calculate_dimensions(area, w / h)
            assert condition_size(w, h, area) == ref == edit_mod.calculate_dimensions(area, w / h)[:2]
            assert ref[0] % 32 == 0 and ref[1] % 32 == 0
    for bad in [(0, 10), (10, -1), (10.0, 10), (True, 10)]:
        with pytest.raises(ValueError, match="positive integer"):
            condition_size(*bad)
    with pytest.raises(ValueError, match="area"):
        condition_size(10, 10, 0)
    with pytest.raises(ValueError, match="too elongated"):
        condition_size(1, 5000, 96 * 96)


def test_tiny_processor_matches_vision_tower(processor, pipe):
    vision = pipe.text_encoder.config.vision_config
    ip = processor.image_processor
    assert isinstance(ip, Qwen2VLImageProcessorPil)
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (
        vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)


def test_edit_features_equal_encode_prompt_batched(edit_pipe, processor):
    # A VAE area above the tiny processor's max_pixels, so its smart_resize also scales down.
    enc = QwenEditTextEncoder(edit_pipe.text_encoder, processor, dataclasses.replace(EDIT, vae_area=256 * 256),
                              batch_size=len(INSTRUCTIONS))
    ours = enc.encode(INSTRUCTIONS, IMAGES)
    ref, mask = edit_pipe.encode_prompt(INSTRUCTIONS, image=[enc.vision_image(im) for im in IMAGES], device="cpu")
    lengths = [o.shape[0] for o in ours]
    assert len(set(lengths)) == len(lengths), "the test needs prompts of different lengths (padding)"
    assert mask is not None and mask.sum(dim=1).tolist() == lengths
    for i, o in enumerate(ours):
        assert o.shape == (lengths[i], TEXT_HIDDEN)
        assert torch.equal(o, ref[i, : lengths[i]]), f"prompt {i} differs from encode_prompt"
        assert torch.count_nonzero(ref[i, lengths[i]:]) == 0
    # One prompt per forward pass changes only floating-point summation order.
    for o, o1 in zip(ours, QwenEditTextEncoder(edit_pipe.text_encoder, processor, enc.template).encode(
            INSTRUCTIONS, IMAGES)):
        torch.testing.assert_close(o1, o, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index", [0, 1])
def test_edit_equals_pipeline_call(edit_pipe, processor, monkeypatch, index):
    real = edit_mod.calculate_dimensions
    # __call__ writes its area as the literal 1024 * 1024: shrink it there (and only there) for speed.
    monkeypatch.setattr(edit_mod, "calculate_dimensions",
                        lambda area, ratio: real(EDIT_AREA if area == 1024 * 1024 else area, ratio))
    instruction, image = INSTRUCTIONS[index], IMAGES[index]
    embeds, image_latents = _run_and_capture(edit_pipe, monkeypatch, image=image, prompt=instruction)

    (features,) = QwenEditTextEncoder(edit_pipe.text_encoder, processor, SMALL_EDIT).encode([instruction], [image])
    assert torch.equal(features, embeds[0])
    cond = QwenEditConditionEncoder(QwenVAEEncoder(edit_pipe.vae), SMALL_EDIT)
    (latents,) = cond.encode([image])
    w, h = condition_size(*image.size, EDIT_AREA)
    assert latents.shape == (Z_DIM, h // 8, w // 8)
    assert torch.equal(pack_latents(latents[None]), image_latents)


def test_plus_equals_pipeline_call(plus_pipe, processor, monkeypatch):
    monkeypatch.setattr(plus_mod, "CONDITION_IMAGE_SIZE", PLUS_VISION_AREA)
    monkeypatch.setattr(plus_mod, "VAE_IMAGE_SIZE", PLUS_VAE_AREA)
    images, instruction = IMAGES[:2], INSTRUCTIONS[2]
    embeds, image_latents = _run_and_capture(plus_pipe, monkeypatch, image=images, prompt=instruction)

    (features,) = QwenEditTextEncoder(plus_pipe.text_encoder, processor, SMALL_PLUS).encode([instruction], [images])
    assert torch.equal(features, embeds[0])
    latents = QwenEditConditionEncoder(QwenVAEEncoder(plus_pipe.vae), SMALL_PLUS).encode(images)
    assert [z.shape[1:] for z in latents] == [(condition_size(*im.size, PLUS_VAE_AREA)[1] // 8,
                                               condition_size(*im.size, PLUS_VAE_AREA)[0] // 8) for im in images]
    assert torch.equal(torch.cat([pack_latents(z[None]) for z in latents], dim=1), image_latents)


def test_plus_batches_prompts_with_different_image_counts(plus_pipe, processor):
    # The Plus pipeline encodes one prompt at a time (all its images belong to it); we batch several.
    enc = QwenEditTextEncoder(plus_pipe.text_encoder, processor, SMALL_PLUS)
    batch = [[IMAGES[0]], IMAGES[1:4]]
    ours = enc.encode(INSTRUCTIONS[:2], batch)
    for o, instruction, images in zip(ours, INSTRUCTIONS[:2], batch):
        ref, _ = plus_pipe.encode_prompt(instruction, image=[enc.vision_image(im) for im in images], device="cpu")
        torch.testing.assert_close(o, ref[0], rtol=1e-5, atol=1e-5)


def test_image_modes_and_bad_input(edit_pipe, processor):
    tiny = dataclasses.replace(EDIT, vae_area=64 * 64)
    enc = QwenEditTextEncoder(edit_pipe.text_encoder, processor, tiny)
    cond = QwenEditConditionEncoder(QwenVAEEncoder(edit_pipe.vae), tiny)
    rgb = IMAGES[1]
    for mode in ("RGBA", "L"):
        other = rgb.convert(mode)
        converted = other.convert("RGB")
        assert torch.equal(enc.encode(["x"], [other])[0], enc.encode(["x"], [converted])[0])
        assert torch.equal(cond.encode([other])[0], cond.encode([converted])[0])
    with pytest.raises(TypeError, match="PIL"):
        enc.encode(["x"], [np.asarray(rgb)])
    with pytest.raises(TypeError, match="PIL"):
        cond.encode([np.asarray(rgb)])
    with pytest.raises(TypeError, match="list of images"):
        cond.encode(rgb)
    with pytest.raises(TypeError, match="list of instructions"):
        enc.encode("x", [rgb])
    with pytest.raises(ValueError, match="exactly one condition image"):
        enc.encode(["x"], [[rgb, rgb]])
    with pytest.raises(ValueError, match="2 instructions but 1"):
        enc.encode(["x", "y"], [rgb])


def test_encoders_load_from_pipeline_dir(tiny_dir, edit_pipe, processor):
    enc = QwenEditTextEncoder.from_pretrained(tiny_dir, template=SMALL_EDIT)
    ref = QwenEditTextEncoder(edit_pipe.text_encoder, processor, SMALL_EDIT)
    assert torch.equal(enc.encode(INSTRUCTIONS[:1], IMAGES[:1])[0], ref.encode(INSTRUCTIONS[:1], IMAGES[:1])[0])
    cond = QwenEditConditionEncoder.from_pretrained(tiny_dir, template=SMALL_EDIT)
    ref_cond = QwenEditConditionEncoder(QwenVAEEncoder(edit_pipe.vae), SMALL_EDIT)
    assert torch.equal(cond.encode(IMAGES[:1])[0], ref_cond.encode(IMAGES[:1])[0])
    with pytest.raises(EncoderDirError, match="Qwen2-VL processor"):
        QwenEditTextEncoder.from_pretrained(tiny_dir + "/text_encoder")
