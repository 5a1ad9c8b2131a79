"""Model-based filters: the CLIP-score filter on a tiny random CLIP vs. CLIPModel's own logits, and plug-ins."""
import numpy as np
import pytest
import torch

from megatron_qwen_image.config import ConfigError
from megatron_qwen_image.encoders.make_tiny import ensure_tiny
from producer.config import ModelFilterSpec
from producer.model_filters import ClipScoreFilter, ModelFilter, build_model_filter


class ConstantFilter(ModelFilter):
    """A plug-in used by the test: scores every sample with the caption length."""

    reason = "constant"

    def score(self, images, captions):
        return [float(len(c)) for c in captions]


class DiskFullFilter(ModelFilter):
    """A plug-in that fails as a full disk does, a few calls deep (the Ray tests' disk-full case): the
    traceback text is long, and its root cause is its last line."""

    reason = "disk_full"

    def score(self, images, captions):
        return self._write_scores(captions)

    def _write_scores(self, captions):
        return self._flush(len(captions))

    def _flush(self, n):
        raise OSError(28, "No space left on device")


@pytest.fixture(scope="module")
def clip_dir():
    return ensure_tiny() + "/clip"


def _images(n):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48 + 16 * i, 64, 3), dtype=np.uint8) for i in range(n)]


def test_clip_score_equals_clip_logits(clip_dir):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    images, captions = _images(3), ["a red cat", "blue sky over the sea", "hello world"]
    f = ClipScoreFilter(clip_dir, min_score=-100.0, batch_size=2)
    scores = f.score(images, captions)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    proc, tok = AutoImageProcessor.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        out = model(pixel_values=proc(images=[Image.fromarray(a) for a in images], return_tensors="pt")["pixel_values"],
                    **tok(captions, padding=True, return_tensors="pt"))
    cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(torch.tensor(scores), 100 * cos, rtol=1e-4, atol=1e-4)


def test_thresholds_drop_under_reason(clip_dir):
    images, captions = _images(4), ["a red cat", "blue sky", "hello world", "green tree"]
    scores = ClipScoreFilter(clip_dir, min_score=-100).score(images, captions)
    assert len(set(scores)) == 4
    cut = sorted(scores)[1] + 1e-6
    reasons, _ = build_model_filter(ModelFilterSpec("clip_score", {"model_dir": clip_dir, "min_score": cut})).apply(
        images, captions)
    assert reasons.count("clip_score") == sum(s < cut for s in scores) == 2


def test_plugin_by_module_path_and_errors(clip_dir):
    f = build_model_filter(ModelFilterSpec("tests.test_producer_model_filters:ConstantFilter",
                                           {"max_score": 5, "reason": "too_wordy"}))
    assert f.apply(_images(2), ["abc", "abcdefgh"])[0] == [None, "too_wordy"]
    with pytest.raises(ConfigError, match="unknown"):
        build_model_filter(ModelFilterSpec("nsfw", {}))
    with pytest.raises(ConfigError, match="not a producer.model_filters.ModelFilter"):
        build_model_filter(ModelFilterSpec("collections:OrderedDict", {}))
    with pytest.raises(ConfigError, match="min_score"):
        build_model_filter(ModelFilterSpec("clip_score", {"model_dir": clip_dir}))
    with pytest.raises(ConfigError, match="cannot load"):
        build_model_filter(ModelFilterSpec("clip_score", {"model_dir": clip_dir + "/missing", "min_score": 1}))
