"""The work each Ray actor does, as plain classes (usable and testable without Ray).

`CpuWorker.process_shard` reads one input shard and yields chunks of filtered, bucket-resized samples;
`EncoderWorker` runs the model filters, the VAE and the MLLM on each chunk and writes the results with
the cache's `CacheWriter` — one writer per work unit, committed only when the shard's last chunk is in.

An encoder that restarts loses its open writers. So every call carries (work unit, attempt, chunk
index): a chunk that does not continue an open writer of the same attempt is refused (`StaleAttempt`),
and `commit` checks the chunk count — a restarted actor can never commit part of a shard.

A shard that ends early (`sources.ENDED_EARLY`: a truncated tar, an unreadable Parquet file) fails its
attempt with `IncompleteShard` after its last chunk, so its work unit is not committed with part of its
samples, unless `sources.commit_partial_units`.
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from PIL import Image

from megatron_qwen_image.cache import CacheWriter
from megatron_qwen_image.cache.buckets import EDIT_PLUS_VISION_AREA
from producer.categories import UNCATEGORISED, Categorizer
from producer.config import ProducerConfig
from producer.errors import IncompleteShard
from producer.filters import Prepared, SampleFilter
from producer.sources import ENDED_EARLY, BadRecord, ShardSpec, iter_shard


class StaleAttempt(RuntimeError):
    """A chunk or commit for a work-unit attempt this actor has no (complete) writer for."""


@dataclass
class Chunk:
    work_unit: str
    index: int
    samples: list  # of filters.Prepared
    seen: int  # input records (samples + bad records) this chunk covers
    drops: dict = field(default_factory=dict)
    transforms: dict = field(default_factory=dict)
    cpu_seconds: float = 0.0
    scores: dict = field(default_factory=dict)  # score histogram counts (producer/score_histograms.py)


@dataclass
class _OpenWorkUnit:
    """The writer of one work-unit attempt, and how many of its chunks it holds so far."""
    attempt: int
    writer: CacheWriter
    chunks: int = 0


def set_threads(n: int) -> None:
    """Limit intra-op threads: several actors share a node's cores."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def json_safe(obj):
    """Metadata as strict JSON (the cache refuses NaN/inf and non-JSON types): NaN/inf -> None, bytes dropped."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items() if not isinstance(v, (bytes, bytearray))}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


class CpuWorker:
    """Decode + filters + bucket resize for one shard at a time."""

    def __init__(self, cfg: ProducerConfig):
        set_threads(cfg.pools.threads_per_actor)
        self.cfg = cfg
        tokenizer = None
        f = cfg.filters
        if f.min_caption_tokens is not None or f.max_caption_tokens is not None:
            # Imported here: the encoders load transformers and diffusers (~5 s and ~150 MB more per process),
            # which a CPU actor needs only for this filter's tokenizer.
            from megatron_qwen_image.encoders.text import load_tokenizer

            if not cfg.encoders.dir:
                raise ValueError("encoders.dir is required: the caption-length filter uses the MLLM tokenizer")
            tokenizer = load_tokenizer(cfg.encoders.dir)
        vision_area = EDIT_PLUS_VISION_AREA if cfg.edit.template == "edit_plus" else None
        self.filter = SampleFilter(f, cfg.base_resolution, tokenizer, cfg.edit.condition_area, vision_area)
        self.categorize = Categorizer(cfg.categories)

    def ping(self) -> int:
        return os.getpid()

    def cpu_seconds(self) -> float:
        """CPU time this actor's process has used (benchmarks: utilisation = CPU seconds / wall seconds)."""
        return time.process_time()

    def process_shard(self, spec: ShardSpec, chunk_size: int | None = None):
        """Yield `Chunk`s of at most `chunk_size` input records, in the shard's order (always >= 1 chunk).
        Raises IncompleteShard at the end of a shard that ended early, unless sources.commit_partial_units."""
        chunk_size = chunk_size or self.cfg.pools.chunk_size
        self.filter.start_shard()
        buf, index, ended_early = [], 0, None
        for rec in iter_shard(spec, self.cfg.sources):
            if isinstance(rec, BadRecord) and rec.reason in ENDED_EARLY:
                ended_early = rec
            buf.append(rec)
            if len(buf) >= chunk_size:
                yield self._chunk(spec, index, buf)
                buf, index = [], index + 1
        if ended_early is not None and not self.cfg.sources.commit_partial_units:
            raise IncompleteShard(
                f"{spec.path} ended early ({ended_early.reason}: {ended_early.detail}); "
                "its work unit is not committed and the next run tries it again (replace the file, or set "
                "sources.commit_partial_units=true to commit the complete samples)")
        if buf or index == 0:
            yield self._chunk(spec, index, buf)

    def _chunk(self, spec: ShardSpec, index: int, records: list) -> Chunk:
        t0 = time.process_time()
        kept, drops, transforms, scores = self.filter.process(records)
        for s in kept:
            category = self.categorize(s.meta["source_meta"], s.caption)
            if category is not None:
                s.meta["category"] = category
        return Chunk(spec.work_unit, index, kept, len(records), dict(drops), dict(transforms),
                     time.process_time() - t0, dict(scores))


class EncoderWorker:
    """Model filters -> VAE latents + MLLM text features -> CacheWriter, per work unit."""

    def __init__(self, cfg: ProducerConfig, cache_dir: str):
        # Imported here, not at the top: the driver and every CPU actor import this module too, and must
        # not pay for transformers and diffusers (~5 s and ~150 MB more per process) that only encoders run.
        from megatron_qwen_image.encoders.text import QwenTextEncoder
        from megatron_qwen_image.encoders.vae import QwenVAEEncoder
        from producer.model_filters import build_model_filter

        set_threads(cfg.pools.threads_per_actor)
        if not cfg.encoders.dir:
            raise ValueError("encoders.dir is required (a local Qwen-Image repo or make_tiny output)")
        e = cfg.encoders
        device = e.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(e.dtype)
        if dtype is None:  # auto
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.cfg, self.cache_dir, self.device = cfg, cache_dir, device
        self.text = QwenTextEncoder.from_pretrained(e.dir, device=device, dtype=dtype, batch_size=e.text_batch_size)
        self.vae = QwenVAEEncoder.from_pretrained(e.dir, device=device, dtype=dtype, sample_mode=e.vae_sample_mode,
                                                  seed=e.seed, batch_size=e.vae_batch_size)
        self.model_filters = [build_model_filter(s, device) for s in cfg.model_filters]
        self.writers: dict[str, _OpenWorkUnit] = {}  # by work unit
        self._device, self._dtype = device, dtype
        self._edit = None  # (QwenEditTextEncoder, QwenEditConditionEncoder), loaded with the first edit sample

    def ping(self) -> int:
        return os.getpid()

    def _writer(self, work_unit: str, attempt: int, index: int) -> _OpenWorkUnit:
        w = self.writers.get(work_unit)
        if w is not None and w.attempt != attempt:
            self.abort(work_unit)  # an older attempt's leftovers (its shard was rescheduled)
            w = None
        if w is None:
            if index != 0:
                raise StaleAttempt(f"{work_unit!r} attempt {attempt}: chunk {index} arrived but this actor has no "
                                   "writer for it (the actor restarted); the shard must be redone")
            writer = CacheWriter(self.cache_dir, work_unit, latent_dtype=self.cfg.latent_dtype,
                                 base_resolution=self.cfg.base_resolution)
            w = self.writers[work_unit] = _OpenWorkUnit(attempt, writer)
        if w.chunks != index:
            raise StaleAttempt(f"{work_unit!r} attempt {attempt}: expected chunk {w.chunks}, got {index}")
        return w

    def add_chunk(self, work_unit: str, attempt: int, chunk: Chunk) -> dict:
        """Encode and add one chunk; returns its stats (seen, written, drops, transforms, buckets)."""
        t0 = time.perf_counter()
        w = self._writer(work_unit, attempt, chunk.index)
        w.chunks += 1
        writer = w.writer
        stats = {"seen": chunk.seen, "written": 0, "drops": Counter(chunk.drops), "transforms": dict(chunk.transforms),
                 "buckets": Counter(), "categories": Counter(), "tasks": Counter(), "cpu_seconds": chunk.cpu_seconds,
                 "scores": dict(chunk.scores)}
        samples: list[Prepared] = chunk.samples
        if writer.already_committed:  # a rerun raced a commit: nothing to add, never duplicate
            stats["already_committed"] = True
            return self._finish_stats(stats, t0)
        scores: dict[str, dict] = {}
        for mf in self.model_filters:
            if not samples:
                break
            reasons, vals = mf.apply([s.image for s in samples], [s.caption for s in samples])
            keep = []
            for s, r, v in zip(samples, reasons, vals):
                scores.setdefault(s.key, {})[mf.reason] = round(v, 4)
                if r:
                    stats["drops"][r] += 1
                else:
                    keep.append(s)
            samples = keep
        if samples:
            latents = self._encode_images(samples)
            texts, conds = self._encode_texts(samples)
            for s, lat, txt, cond in zip(samples, latents, texts, conds):
                meta = dict(s.meta)
                if s.key in scores:
                    meta.setdefault("scores", {}).update(scores[s.key])
                meta["text_tokens"] = int(txt.shape[0])
                writer.add(s.key, lat.cpu(), txt.cpu(), s.caption, s.source, json_safe(meta),
                           cond_latents=[c.cpu() for c in cond] or None)
                stats["buckets"][f"{s.image.shape[1]}x{s.image.shape[0]}"] += 1
                stats["categories"][s.meta.get("category", UNCATEGORISED)] += 1
                stats["tasks"]["ti2i" if cond else "t2i"] += 1
            stats["written"] = len(samples)
        return self._finish_stats(stats, t0)

    def _encode_texts(self, samples: list[Prepared]) -> tuple[list, list]:
        """Text features and condition latents in input order: a caption alone (text-to-image) through the T2I
        template; an edit sample's instruction with its source images through the edit template, and the
        sources through the VAE. The edit samples' images are already sized (buckets.condition_image)."""
        texts, conds = [None] * len(samples), [[] for _ in samples]
        plain = [i for i, s in enumerate(samples) if not s.cond_images]
        edits = [i for i, s in enumerate(samples) if s.cond_images]
        for i, t in zip(plain, self.text.encode([samples[i].caption for i in plain])):
            texts[i] = t
        if edits:
            text, vae = self._edit_encoders()
            vision = [[Image.fromarray(a) for a in (samples[i].cond_vision or samples[i].cond_images)] for i in edits]
            for i, t in zip(edits, text.encode([samples[i].caption for i in edits], vision, presized=True)):
                texts[i] = t
            for i in edits:
                conds[i] = vae.encode([Image.fromarray(a) for a in samples[i].cond_images], presized=True)
        return texts, conds

    def _edit_encoders(self):
        """The edit encoders (edit.template), loaded once, on the first edit sample: a text-to-image run needs no
        processor/ directory."""
        if self._edit is None:
            from megatron_qwen_image.encoders.edit import TEMPLATES, QwenEditConditionEncoder, QwenEditTextEncoder

            e, template = self.cfg.encoders, TEMPLATES[self.cfg.edit.template]
            text = QwenEditTextEncoder.from_pretrained(e.dir, device=self._device, dtype=self._dtype, template=template,
                                                       batch_size=e.text_batch_size)
            self._edit = text, QwenEditConditionEncoder(self.vae, template)
        return self._edit

    def _encode_images(self, samples: list[Prepared]) -> list:
        """VAE latents in input order; same-size images are batched together."""
        by_size: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            by_size.setdefault(s.image.shape, []).append(i)
        out = [None] * len(samples)
        for idx in by_size.values():
            z = self.vae.encode([samples[i].image for i in idx], keys=[samples[i].key for i in idx])
            for j, i in enumerate(idx):
                out[i] = z[j]
        return out

    @staticmethod
    def _finish_stats(stats: dict, t0: float) -> dict:
        stats["drops"] = dict(stats["drops"])
        stats["buckets"] = dict(stats["buckets"])
        stats["categories"] = dict(stats["categories"])
        stats["tasks"] = dict(stats["tasks"])
        stats["encode_seconds"] = time.perf_counter() - t0
        return stats

    def commit(self, work_unit: str, attempt: int, num_chunks: int, input_fingerprint: dict | None = None,
               supersedes: str | None = None) -> dict:
        """Commit a work unit once all its `num_chunks` chunks of this attempt were added (recording the input's
        fingerprint and the version it supersedes, see CacheWriter.commit). `committed_elsewhere`: another
        writer had committed the unit, this attempt was discarded."""
        w = self.writers.get(work_unit)
        if w is None or w.attempt != attempt or w.chunks != num_chunks:
            got = None if w is None else (w.attempt, w.chunks)
            raise StaleAttempt(f"{work_unit!r} attempt {attempt}: cannot commit {num_chunks} chunks, this actor has "
                               f"(attempt, chunks) = {got}")
        del self.writers[work_unit]
        entry = w.writer.commit(input_fingerprint=input_fingerprint, supersedes=supersedes)
        return {"num_samples": entry.get("num_samples", 0), "shards": len(entry.get("shards", [])),
                "seq": entry.get("seq"), "committed_elsewhere": w.writer.already_committed}

    def abort(self, work_unit: str) -> bool:
        """Drop an open writer (its temp files are deleted; nothing becomes visible)."""
        w = self.writers.pop(work_unit, None)
        if w is not None:
            w.writer.abort()
        return w is not None
