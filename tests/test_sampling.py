"""The sampler (megatron_qwen_image.sampling) and `python -m consumer.sample` against diffusers' QwenImagePipeline.

Reference: a tiny model trained 3 steps here (TP=2, sequence parallel), exported with our converter into a
diffusers pipeline directory beside the tiny encoders of make_tiny; QwenImagePipeline runs it with the same
prompt embeddings (or the same prompts), the same initial latents (or the same seeds), steps and true_cfg_scale.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from consumer.sample import load_model, main as sample_main
from megatron_qwen_image.convert.exporter import export_diffusers
from megatron_qwen_image.encoders.text import QwenTextEncoder
from megatron_qwen_image.encoders.vae import QwenVAEEncoder
from megatron_qwen_image.encoders.make_tiny import ensure_tiny
from megatron_qwen_image.sampling import TextBatch, initial_noise, load_scheduler, sample_latents
from tests.reference_models import rel_max_err, single_process_model_parallel
from tests.torchrun import torchrun

WIDTH, HEIGHT = 64, 48  # latents 8 x 6, 4 x 3 = 12 image tokens
PROMPTS = ["a red sign that reads OPEN on a white wall", "a cat"]  # different lengths: padded batch
NEGATIVES = [" ", "blurry dark photo"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step TP=2 training checkpoint, and a pipeline directory: the tiny encoders + its exported transformer."""
    root = tmp_path_factory.mktemp("sampling")
    tiny = ensure_tiny()
    torchrun(2, ["-m", "consumer.train", "--config", "configs/smoke_tp2.yaml", "--data", "synthetic",
                 "train.train_iters=3", "--save", str(root / "ckpt"), "--log-jsonl", str(root / "stats.jsonl")],
             timeout=300)
    pipeline_dir = root / "pipeline"
    pipeline_dir.mkdir()
    for part in ("tokenizer", "text_encoder", "vae", "scheduler", "model_index.json"):
        os.symlink(os.path.join(tiny, part), pipeline_dir / part)
    export_diffusers(str(root / "ckpt"), str(pipeline_dir / "transformer"), progress=False)
    return {"root": root, "ckpt": str(root / "ckpt" / "iter_0000003"), "tiny": tiny, "pipeline_dir": str(pipeline_dir)}


@pytest.fixture(scope="module")
def exported(trained):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(trained["pipeline_dir"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline(exported, text, negative, latents, guidance, output_type):
    kwargs = dict(prompt_embeds=text.embeds, prompt_embeds_mask=text.mask, latents=latents, width=WIDTH,
                  height=HEIGHT, num_inference_steps=3, true_cfg_scale=guidance, output_type=output_type)
    if negative is not None:
        kwargs.update(negative_prompt_embeds=negative.embeds, negative_prompt_embeds_mask=negative.mask)
    return exported(**kwargs).images


@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["no-guidance", "true-cfg"])
def test_sampler_equals_the_pipeline_at_tp1(trained, exported, guidance):
    encoder = QwenTextEncoder(exported.text_encoder, exported.tokenizer)
    text = TextBatch.from_list(encoder.encode(PROMPTS))
    assert len(set(text.lengths)) == 2  # a padded batch
    negative = TextBatch.from_list(encoder.encode(NEGATIVES)) if guidance > 1 else None
    noise = initial_noise([torch.Generator().manual_seed(s) for s in (11, 12)], 2, WIDTH, HEIGHT)
    with single_process_model_parallel():
        model = load_model(trained["ckpt"], tp=1, device=torch.device("cpu"), bf16=False)
        ours = sample_latents(model, text, noise, WIDTH, HEIGHT, 3, load_scheduler(trained["tiny"]), negative, guidance)
    ref = _pipeline(exported, text, negative, noise, guidance, "latent")
    assert rel_max_err(ours, ref) <= 1e-5
    assert rel_max_err(ours, noise) > 0.05  # the loop moved the latents

    vae = QwenVAEEncoder(exported.vae)
    from megatron_qwen_image.model import unpack_latents

    images = vae.decode(unpack_latents(ours, HEIGHT // 8, WIDTH // 8))
    ref_images = _pipeline(exported, text, negative, noise, guidance, "pt")  # in [0, 1]
    assert images.shape == ref_images.shape == (2, 3, HEIGHT, WIDTH)
    assert rel_max_err((images / 2 + 0.5).clamp(0, 1), ref_images) <= 1e-5


def test_sample_command_at_tp2_reproduces_the_pipeline_from_seeds(trained, exported, tmp_path):
    """torchrun 2 x consumer.sample (TP=2) from the training checkpoint: two prompts with negative prompts
    (guided) and one without (unguided); the pipeline gets the same prompts as text and generators seeded as
    the command documents; latents within 1e-5, PNGs within one grey level."""
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("- {prompt: '%s', negative_prompt: '%s', seed: 3}\n"
                       "- {prompt: '%s', negative_prompt: '%s', seed: 4}\n"
                       "- {prompt: 'a green tree', seed: 5}\n" % (PROMPTS[0], NEGATIVES[0], PROMPTS[1], NEGATIVES[1]))
    out = tmp_path / "out"
    log = torchrun(2, ["-m", "consumer.sample", "--load", str(trained["root"] / "ckpt"), "--encoders", trained["tiny"],
                       "--prompts", str(prompts), "--width", str(WIDTH), "--height", str(HEIGHT), "--steps", "3",
                       "--guidance", "3", "--save-latents", "--out", str(out)], timeout=300)
    assert "at TP 2" in log and "3 images" in log
    latents = torch.load(out / "latents.pt")
    records = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [r["seed"] for r in records] == [3, 4, 5] and (out / "grid.png").is_file()

    common = dict(width=WIDTH, height=HEIGHT, num_inference_steps=3, true_cfg_scale=3.0)
    guided = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, **common)
    unguided = dict(prompt=["a green tree"], **common)
    for kwargs, seeds, idx in ((guided, (3, 4), [0, 1]), (unguided, (5,), [2])):
        gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
        ref = exported(**kwargs, generator=gens(), output_type="latent").images
        assert rel_max_err(torch.stack([latents[i] for i in idx]), ref) <= 1e-5
        ref_png = exported(**kwargs, generator=gens(), output_type="pil").images
        for i, ref_image in zip(idx, ref_png):
            ours = np.asarray(Image.open(out / records[i]["file"]), dtype=np.int16)
            assert ours.shape == (HEIGHT, WIDTH, 3)
            assert np.abs(ours - np.asarray(ref_image, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--width", "100"], "--width"),
    (["--prompt", "x", "--steps", "0"], "--steps"),
    ([], "--prompt TEXT"),
], ids=["size-not-multiple-of-16", "no-steps", "no-prompt"])
def test_sample_command_refuses_bad_arguments_in_one_line(trained, capsys, args, message):
    code = sample_main(["--load", str(trained["root"] / "ckpt"), "--encoders", trained["tiny"], *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_sample_command_refuses_a_missing_vae_and_checkpoints_that_are_not_there(trained, tmp_path, capsys):
    no_vae = tmp_path / "encoders"
    no_vae.mkdir()
    for part in ("tokenizer", "text_encoder"):
        os.symlink(os.path.join(trained["tiny"], part), no_vae / part)
    assert sample_main(["--load", str(trained["root"] / "ckpt"), "--encoders", str(no_vae), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "VAE" in err, err
    for flag in ("--load", "--pretrained"):
        assert sample_main([flag, str(tmp_path / "nothing"), "--encoders", trained["tiny"], "--prompt", "x"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{flag} {tmp_path / 'nothing'}: no complete checkpoint" in err, err
