"""Encoders vs. diffusers' own Qwen-Image pipelines, on tiny random models built locally (make_tiny).

The references are diffusers' code paths, run on the same weights: `QwenImagePipeline.encode_prompt`
for text features and `QwenImageImg2ImgPipeline._encode_vae_image` (+ its VaeImageProcessor) for latents.
"""
import functools

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_qwen_image.encoders.text import PROMPT_TEMPLATE, QwenTextEncoder
from megatron_qwen_image.encoders.vae import QwenVAEEncoder, image_to_tensor
from megatron_qwen_image.encoders.make_tiny import TEXT_HIDDEN, Z_DIM
from megatron_qwen_image.encoders.text import template_drop_index
from megatron_qwen_image.encoders.vae import key_generator

PROMPTS = [
    "A red cat sitting on a mat.",
    "一张海报，上面写着“你好世界”，背景是蓝色的。",
    "hello",
    "A poster with the text \"OPEN DAILY / Fresh Coffee\" written in dark blue letters on a cream background, "
    "with a small cup drawn in the corner and a gradient sky above it.",
]


@pytest.fixture(scope="module")
def img2img(tiny_dir):
    from diffusers import QwenImageImg2ImgPipeline

    return QwenImageImg2ImgPipeline.from_pretrained(tiny_dir)


def test_tiny_models_have_contract_sizes(pipe):
    assert pipe.text_encoder.config.text_config.hidden_size == TEXT_HIDDEN == 64
    assert pipe.vae.config.z_dim == Z_DIM == 16
    assert pipe.vae_scale_factor == 8
    for tok in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|image_pad|>"):
        ids = pipe.tokenizer(tok, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"{tok} must be a single special token, got {ids}"


def test_template_and_drop_index_match_pipeline(pipe):
    # Our template is the pipeline's, and the drop index computed from the tokenizer equals diffusers'
    # hard-coded 34 (the tiny vocabulary holds each template word whole, as the real one does).
    assert PROMPT_TEMPLATE == pipe.prompt_template_encode
    assert template_drop_index(pipe.tokenizer) == pipe.prompt_template_encode_start_idx == 34


def test_text_features_equal_encode_prompt(pipe):
    enc = QwenTextEncoder(pipe.text_encoder, pipe.tokenizer, batch_size=len(PROMPTS))
    ours = enc.encode(PROMPTS)
    ref, mask = pipe.encode_prompt(PROMPTS, device="cpu")
    lengths = [o.shape[0] for o in ours]
    assert len(set(lengths)) > 1, "the test needs prompts of different lengths (padding)"
    assert mask is not None and mask.sum(dim=1).tolist() == lengths
    assert ref.shape[1] == max(lengths)
    for i, o in enumerate(ours):
        assert o.shape == (lengths[i], TEXT_HIDDEN)
        assert torch.equal(o, ref[i, : lengths[i]]), f"prompt {i} differs from encode_prompt"
        assert torch.count_nonzero(ref[i, lengths[i]:]) == 0  # the pipeline's padding is what we drop
    assert enc.token_lengths(PROMPTS) == lengths


def test_text_features_independent_of_batching(pipe):
    enc1 = QwenTextEncoder(pipe.text_encoder, pipe.tokenizer, batch_size=1)
    ref, _ = pipe.encode_prompt(PROMPTS, device="cpu")
    for i, o in enumerate(enc1.encode(PROMPTS)):
        torch.testing.assert_close(o, ref[i, : o.shape[0]], rtol=1e-5, atol=1e-5)


def test_text_features_truncate_at_1024_like_pipeline(pipe):
    long_prompt = " ".join(["red blue green"] * 500)  # > 1024 tokens
    enc = QwenTextEncoder(pipe.text_encoder, pipe.tokenizer)
    (ours,) = enc.encode([long_prompt])
    ref, mask = pipe.encode_prompt([long_prompt], device="cpu")
    assert ours.shape[0] == ref.shape[1] == 1024
    assert torch.equal(ours, ref[0])
    assert enc.token_lengths([long_prompt]) == [1024]


def test_text_encoder_loads_from_pipeline_dir(tiny_dir, pipe):
    enc = QwenTextEncoder.from_pretrained(tiny_dir)
    ref, _ = pipe.encode_prompt(PROMPTS[:2], device="cpu")
    for i, o in enumerate(enc.encode(PROMPTS[:2])):
        assert torch.equal(o, ref[i, : o.shape[0]])
    with pytest.raises(FileNotFoundError, match="text encoder"):
        QwenTextEncoder.from_pretrained(tiny_dir + "/scheduler")


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_preprocessing_equals_vae_image_processor(img2img):
    img = _image(64, 48)
    ref = img2img.image_processor.preprocess(img, height=48, width=64)
    assert torch.equal(image_to_tensor(img)[None], ref)


def test_vae_latents_equal_img2img_pipeline_mode(img2img, monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img as mod

    # The pipeline samples by default; run its own code with the distribution's mode instead.
    monkeypatch.setattr(mod, "retrieve_latents", functools.partial(mod.retrieve_latents, sample_mode="argmax"))
    images = [_image(64, 48, s) for s in range(3)]
    x = torch.cat([img2img.image_processor.preprocess(im, height=48, width=64) for im in images])
    ref = img2img._encode_vae_image(x.unsqueeze(2), generator=None)[:, :, 0]
    enc = QwenVAEEncoder(img2img.vae, batch_size=3)
    ours = enc.encode(images)
    assert ours.shape == (3, Z_DIM, 48 // 8, 64 // 8)
    assert torch.equal(ours, ref)
    # Other batch sizes change only floating-point summation order.
    torch.testing.assert_close(QwenVAEEncoder(img2img.vae, batch_size=2).encode(images), ref, rtol=1e-5, atol=1e-5)
    # ... and the text-to-image pipeline's de-normalisation (before decoding) inverts ours.
    torch.testing.assert_close(enc.denormalize(ours.unsqueeze(2)), enc.denormalize(ref.unsqueeze(2)))


def test_vae_sampled_latents_equal_pipeline_with_same_generator(img2img):
    img = _image(32, 64, 7)
    enc = QwenVAEEncoder(img2img.vae, sample_mode="sample", seed=11)
    ours = enc.encode([img], keys=["sample-key"])
    x = img2img.image_processor.preprocess(img, height=64, width=32).unsqueeze(2)
    ref = img2img._encode_vae_image(x, generator=key_generator("sample-key", 11))[:, :, 0]
    assert torch.equal(ours, ref)
    again = enc.encode([img], keys=["sample-key"])
    assert torch.equal(ours, again), "sampled latents must be reproducible per key (idempotent redo)"


def test_vae_refuses_mixed_or_unaligned_sizes(img2img):
    enc = QwenVAEEncoder(img2img.vae)
    with pytest.raises(ValueError, match="one size"):
        enc.encode([_image(32, 32), _image(64, 32)])
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        enc.encode([_image(36, 32)])
