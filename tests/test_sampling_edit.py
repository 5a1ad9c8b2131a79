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
