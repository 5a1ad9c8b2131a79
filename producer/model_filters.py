"""Model-based filters (NSFW, image-text alignment, aesthetics): a plug-in interface + a CLIP-family scorer.

A model filter scores a batch of bucketed images with their captions and drops samples whose score
falls outside [min_score, max_score], counting them under the filter's reason name. They run in the
encoder actors (where the GPUs are), before the VAE and the MLLM, so rejected samples cost no encoding.

Configure in the producer YAML:

    model_filters:
      - type: clip_score                       # registered name ...
        options: {model_dir: /models/clip-vit-l-14, min_score: 22.0}
      - type: my_pkg.nsfw:NsfwFilter           # ... or "module:Class" of any ModelFilter subclass
        options: {model_dir: /models/nsfw, max_score: 0.5, reason: nsfw}

Models load from a local directory with `from_pretrained(..., local_files_only=True)`; nothing is downloaded.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from megatron_qwen_image.config import ConfigError
from producer.config import ModelFilterSpec


class ModelFilter:
    """Base class of model-based filters. Subclasses implement `score`; `reason` names the drop counter."""

    reason = "model_filter"

    def __init__(self, min_score: float | None = None, max_score: float | None = None, reason: str | None = None):
        if min_score is None and max_score is None:
            raise ConfigError("model_filters", f"{type(self).__name__}: set min_score and/or max_score, else it filters "
                              "nothing")
        self.min_score, self.max_score = min_score, max_score
        if reason:
            self.reason = reason

    def score(self, images: Sequence[np.ndarray], captions: Sequence[str]) -> list[float]:
        """One score per (image uint8 HxWx3, caption) pair."""
        raise NotImplementedError

    def apply(self, images: Sequence[np.ndarray], captions: Sequence[str]) -> tuple[list[str | None], list[float]]:
        """-> (drop reason or None per sample, scores)."""
        scores = self.score(images, captions) if len(images) else []
        reasons = []
        for s in scores:
            bad = (self.min_score is not None and s < self.min_score) or (self.max_score is not None and s > self.max_score)
            reasons.append(self.reason if bad else None)
        return reasons, [float(s) for s in scores]


class ClipScoreFilter(ModelFilter):
    """Image-text alignment: 100 * cos(image embedding, text embedding) of a CLIP-family model (CLIP,
    SigLIP) loaded with transformers' Auto classes from a local directory. (CLIPScore also clamps at 0;
    we keep the sign so thresholds below 0 stay meaningful.)"""

    reason = "clip_score"

    def __init__(self, model_dir: str, min_score: float | None = None, max_score: float | None = None,
                 device: str = "cpu", batch_size: int = 32, reason: str | None = None):
        super().__init__(min_score, max_score, reason)
        try:
            self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError("model_filters", f"clip_score: cannot load a CLIP-family model from {model_dir!r}: {e}") from e
        if not hasattr(self.model, "get_image_features") or not hasattr(self.model, "get_text_features"):
            raise ConfigError("model_filters", f"clip_score: {type(self.model).__name__} in {model_dir!r} is not a "
                              "CLIP-family model (needs get_image_features/get_text_features)")
        self.device = device
        self.batch_size = batch_size
        text_cfg = getattr(self.model.config, "text_config", None)
        self.max_text_len = getattr(text_cfg, "max_position_embeddings", 77)

    @staticmethod
    def _features(out) -> torch.Tensor:
        return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a ModelOutput

    @torch.no_grad()
    def score(self, images, captions) -> list[float]:
        scores: list[float] = []
        for i in range(0, len(images), self.batch_size):
            ims = [Image.fromarray(np.asarray(a)) for a in images[i : i + self.batch_size]]
            caps = list(captions[i : i + self.batch_size])
            pix = self.processor(images=ims, return_tensors="pt")["pixel_values"].to(self.device)
            tok = self.tokenizer(caps, padding=True, truncation=True, max_length=self.max_text_len,
                                 return_tensors="pt").to(self.device)
            img_emb = self._features(self.model.get_image_features(pixel_values=pix))
            txt_emb = self._features(self.model.get_text_features(**tok))
            cos = torch.nn.functional.cosine_similarity(img_emb.float(), txt_emb.float(), dim=-1)
            scores.extend((100.0 * cos).tolist())
        return scores


MODEL_FILTERS: dict[str, type[ModelFilter]] = {"clip_score": ClipScoreFilter}


def build_model_filter(spec: ModelFilterSpec, device: str = "cpu") -> ModelFilter:
    """Instantiate one configured filter: a registered name or 'module:Class' (a ModelFilter subclass)."""
    if spec.type in MODEL_FILTERS:
        cls = MODEL_FILTERS[spec.type]
    elif ":" in spec.type:
        mod, _, name = spec.type.partition(":")
        try:
            cls = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError("model_filters", f"type {spec.type!r}: cannot import ({e})") from e
        if not (isinstance(cls, type) and issubclass(cls, ModelFilter)):
            raise ConfigError("model_filters", f"type {spec.type!r} is not a producer.model_filters.ModelFilter subclass")
    else:
        raise ConfigError("model_filters", f"type {spec.type!r}: unknown (registered: {sorted(MODEL_FILTERS)}; "
                          "or give 'module:Class')")
    options = dict(spec.options)
    if "device" not in options and "device" in inspect.signature(cls).parameters:
        options["device"] = device
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigError("model_filters", f"{spec.type!r} options {sorted(options)}: {e}") from e
