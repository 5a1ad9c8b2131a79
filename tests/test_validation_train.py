"""Validation inside the train loop (consumer.validation), on 2 CPU processes at TP=2 with sequence parallelism:

* a run that validates every 2 steps (images of encoded prompts + held-out loss on the training cache's
  held-out keys) trains exactly as the same run without validation;
* it writes samples/step_000002.png and step_000004.png, TensorBoard images and val/* scalars, and val_* keys
  in the stats JSONL;
* resumed from its step-2 checkpoint (with validation on), the run reproduces the uninterrupted losses, the
  step-4 validation loss and the step-4 image grid;
* at TP=1 x DP=2, where megatron DDP overlaps the parameter all-gather with the next forward (validation
  syncs the parameters first and turns its hooks off), validating after every step still trains the same.
"""
import json

import numpy as np
import pytest
from PIL import Image

from megatron_qwen_image.encoders.text import QwenTextEncoder
from megatron_qwen_image.encoders.make_tiny import ensure_tiny
from megatron_qwen_image.prompts import encode_prompts, read_prompts_file, save_encoded
from tests.support.caches import small_cache
from tests.torchrun import torchrun

pytestmark = pytest.mark.slow

STEPS = 4


def _records(jsonl):
    return {r["step"]: r for r in map(json.loads, open(jsonl))}


def _train(tmp, name, *args):
    jsonl = tmp / f"{name}.jsonl"
    out = torchrun(2, ["-m", "consumer.train", "--config", "configs/smoke_tp2.yaml", *args, "--log-jsonl", str(jsonl)],
                   timeout=300)
    return _records(jsonl), out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("validation_train")
    tiny = ensure_tiny()
    (tmp / "prompts.yaml").write_text("- {prompt: 'a red sign that reads OPEN', negative_prompt: ' ', seed: 1}\n"
                                      "- {prompt: 'a cat', width: 80, height: 48, seed: 2}\n")
    prompts = tmp / "prompts.safetensors"
    save_encoded(str(prompts), encode_prompts(read_prompts_file(str(tmp / "prompts.yaml"), 64, 64),
                                              QwenTextEncoder.from_pretrained(tiny)))
    cache = small_cache(tmp / "cache")
    common = [f"train.train_iters={STEPS}", "data.source=cache", f"data.cache_dir={cache}", "train.seed=21",
              "data.cache.holdout_fraction=0.25"]
    validation = ["--eval-interval", "2", f"validation.prompts={prompts}", f"validation.encoders={tiny}",
                  "validation.steps=2", "validation.guidance=3"]
    plain, _ = _train(tmp, "plain", *common)
    ckpt = tmp / "ckpt"
    validated, log = _train(tmp, "validated", *common, *validation, "--save", str(ckpt), "--save-interval", "2",
                            "--tensorboard-dir", str(tmp / "tb"), "validation.samples_dir=" + str(tmp / "samples"))
    resumed, _ = _train(tmp, "resumed", *common, *validation, "--load", str(ckpt / "iter_0000002"),
                        "validation.samples_dir=" + str(tmp / "samples_resumed"))
    return {"tmp": tmp, "plain": plain, "validated": validated, "resumed": resumed, "log": log, "common": common,
            "validation": validation}


def test_validation_does_not_change_training(runs):
    plain, validated = runs["plain"], runs["validated"]
    assert sorted(plain) == sorted(validated) == list(range(1, STEPS + 1))
    assert [plain[s]["loss"] for s in plain] == [validated[s]["loss"] for s in validated]
    assert [s for s in validated if "val_s" in validated[s]] == [2, 4]
    assert not any("val_s" in r for r in plain.values())


def test_validation_writes_grids_tensorboard_and_the_loss(runs):
    tmp, validated = runs["tmp"], runs["validated"]
    for step in (2, 4):
        r = validated[step]
        assert r["val_images"] == 2 and r["val_grid"] == str(tmp / "samples" / f"step_{step:06d}.png")
        assert set(k for k in r if k.startswith("val_loss_sigma_")) == {f"val_loss_sigma_{s:g}"
                                                                         for s in (0.1, 0.3, 0.5, 0.7, 0.9)}
        assert r["val_loss"] == pytest.approx(np.mean([r[f"val_loss_sigma_{s:g}"] for s in (0.1, 0.3, 0.5, 0.7, 0.9)]))
    grids = [np.asarray(Image.open(tmp / "samples" / f"step_{s:06d}.png")) for s in (2, 4)]
    assert grids[0].shape == grids[1].shape and not np.array_equal(*grids)  # two steps of training apart
    assert "validation at step 2 | loss" in runs["log"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Images("validation/samples")] == [2, 4]
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4]
    assert events.Scalars("val/loss")[1].value == pytest.approx(validated[4]["val_loss"])


def test_resumed_run_with_validation_reproduces_losses_validation_and_images(runs):
    tmp, validated, resumed = runs["tmp"], runs["validated"], runs["resumed"]
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert abs(resumed[step]["loss"] - validated[step]["loss"]) <= 1e-6
    assert resumed[4]["val_loss"] == pytest.approx(validated[4]["val_loss"], rel=1e-5)
    ours = np.asarray(Image.open(tmp / "samples_resumed" / "step_000004.png"), dtype=np.int16)
    ref = np.asarray(Image.open(tmp / "samples" / "step_000004.png"), dtype=np.int16)
    assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1


def test_validation_after_every_step_with_overlapped_param_gather_does_not_change_training(runs):
    dp2 = ["parallelism.tensor_model_parallel_size=1", "parallelism.sequence_parallel=false", "train.train_iters=3"]
    plain, log = _train(runs["tmp"], "dp2_plain", *runs["common"], *dp2)
    validated, _ = _train(runs["tmp"], "dp2_validated", *runs["common"], *runs["validation"], *dp2,
                          "--eval-interval", "1", "validation.samples_dir=" + str(runs["tmp"] / "samples_dp2"))
    assert "TP 1 x DP 2" in log and "overlap grad-reduce on, param-gather on" in log
    assert [s for s in validated if "val_s" in validated[s]] == [1, 2, 3]
    assert [plain[s]["loss"] for s in sorted(plain)] == [validated[s]["loss"] for s in sorted(validated)]
