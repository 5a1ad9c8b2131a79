"""Validation loss on held-out data: the flow-matching loss at fixed sigmas, with fixed noise per sample.

The training loss draws a new sigma and noise for every sample at every step, so its curve is noisy and no
two runs can be compared point by point. Here every held-out sample is evaluated at the same sigmas
(DEFAULT_SIGMAS) with noise drawn from its key alone, so the number is a function of the weights and the
held-out set only: comparable across steps, runs and layouts. DP rank r evaluates a fixed slice of the
samples and the per-sigma sums are all-reduced, so every rank reports the same value whatever TP x DP is.

Held-out data is either a separate cache, or the keys of the training cache that
megatron_qwen_image.cache.holdout.held_out selects, which the training loader (`holdout_fraction`) leaves out.
Edit samples (image editing) are scored with their condition latents, as the training step scores them; with
both tasks among the held-out samples, each task's loss is reported too (`val_loss_by_task`).
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_qwen_image.cache import CacheReader, CorruptShardError, collate
from megatron_qwen_image.cache.exclusions import read_exclusions
from megatron_qwen_image.cache.holdout import check_fraction, hash_unit, held_out
from megatron_qwen_image.cache.loader import bucket_set, wanted_shard
from megatron_qwen_image.cache.plan import BatchGroup
from megatron_qwen_image.flow_matching import sample_losses, sample_seed
from megatron_qwen_image.model import pack_latents
from megatron_qwen_image.sampling import pack_conditions

log = logging.getLogger(__name__)

DEFAULT_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)
_NOISE_STEP = -1  # sample_seed's `step` for validation noise: training steps count from 0, so never a training draw


@dataclass
class HeldOutSample:
    """One validation sample, copied out of the cache (the shard views are read-only memory maps)."""
    key: str
    latent: torch.Tensor     # [C, H, W] as stored
    text: torch.Tensor       # [L, D] as stored
    conds: tuple = ()        # an edit sample's condition latents, [C, h, w] each, as stored

    @property
    def task(self) -> str:
        return "ti2i" if self.conds else "t2i"

    @property
    def layout(self) -> tuple:
        """What one forward must share: the latent shape and the condition shapes."""
        return tuple(self.latent.shape), tuple(tuple(c.shape) for c in self.conds)


def load_held_out(cache_dir: str, holdout_fraction: float | None, max_samples: int, base_resolution=None,
                  buckets=None, families=None, tasks=None) -> list[HeldOutSample]:
    """The validation samples of the cache at `cache_dir`: all of them (holdout_fraction None: a separate
    validation cache) or those whose key is held out of training. Ordered by the key's hash, so the first
    `max_samples` are a random subset that does not depend on the shard layout. Samples of the cache's
    exclusion list are skipped as the loader skips them; corrupt shards are skipped with a warning.
    `base_resolution`, `buckets`, `families` (bucket families, e.g. the keys of the loader's family_weights)
    select shards as the training loader does, and `tasks` ("t2i", "ti2i"; None: both) the tasks it trains.
    Raises ValueError if nothing is selected."""
    if holdout_fraction is not None:
        holdout_fraction = check_fraction(holdout_fraction)
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples={max_samples!r} must be an integer >= 1")
    bucket_filter = bucket_set(buckets)
    reader = CacheReader(cache_dir)
    excluded = read_exclusions(reader.root).rows
    bad: dict[str, str] = {}

    def skip(info, error):
        bad[info.path] = str(error)
        log.warning("validation: skipping corrupt shard (%d so far): %s", len(bad), error)

    candidates, total = [], 0  # (hash, key, shard, row)
    for info in reader.shards():
        if not wanted_shard(info, base_resolution, bucket_filter, families):
            continue
        if tasks is not None and BatchGroup.of(info).task not in tasks:
            continue
        try:
            keys = reader.open(info).column("key")
        except CorruptShardError as e:
            skip(info, e)
            continue
        total += len(keys)
        dropped = set(excluded.get(info.path, ()))
        candidates += [(hash_unit(key), key, info, row) for row, key in enumerate(keys) if row not in dropped
                       and (holdout_fraction is None or held_out(key, holdout_fraction))]
    candidates.sort(key=lambda c: (c[0], c[1]))

    samples = []
    for _, key, info, row in candidates:
        if len(samples) == max_samples:
            break
        if info.path in bad:
            continue
        try:
            shard = reader.open(info)
            _, latent, text = shard.sample(row)
            conds = tuple(c.clone() for c in shard.conditions(row))
        except CorruptShardError as e:  # a row failing its checksum: the shard is not trusted further
            skip(info, e)
            continue
        samples.append(HeldOutSample(key, latent.clone(), text.clone(), conds))
    if not samples:
        corrupt = f"; {len(bad)} corrupt shards skipped" if bad else ""
        if holdout_fraction is None:
            raise ValueError(f"no samples to validate on in {reader.root} ({total} readable samples{corrupt})")
        raise ValueError(f"no held-out samples in {reader.root} (holdout_fraction={holdout_fraction} of {total} "
                         f"samples selects none{corrupt}): raise the fraction or give validation.loss_cache_dir")
    return samples


def _fixed_noise(key: str, seed: int, shape) -> torch.Tensor:
    """The sample's noise, the same at every sigma, step and layout: drawn on the CPU in fp32 (device
    generators differ between CPU and GPU, and this must not)."""
    gen = torch.Generator().manual_seed(sample_seed(seed, _NOISE_STEP, key))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def _loss_sums(model, group: list[HeldOutSample], sigmas: Sequence[float], seed: int, patch_size: int,
               device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-sigma sums over one batch (one layout) of the per-sample losses, [len(sigmas)] float64."""
    p = patch_size
    batch = collate([(s.key, s.latent, s.text, s.conds) for s in group], torch.float32)
    lengths = [s.text.shape[0] for s in group]
    b, c, h, w = batch["latents"].shape
    x0 = pack_latents(batch["latents"].to(device), p)
    noise = pack_latents(torch.stack([_fixed_noise(s.key, seed, (c, h, w)) for s in group]).to(device), p)
    text = batch["text_embeds"].to(device).to(dtype)
    cond, grids = None, []
    if batch["cond_latents"]:
        cond, grids = pack_conditions([c.to(device) for c in batch["cond_latents"]], p)
    sums = []
    for sigma in sigmas:  # as the training step scores a micro-batch, at one fixed sigma for the whole batch
        sig = torch.full((b,), sigma, dtype=torch.float32, device=device)
        sums.append(sample_losses(model, x0, noise, sig, text, lengths, (h // p, w // p), dtype, cond,
                                  grids).double().sum())
    return torch.stack(sums)


@torch.no_grad()
def validation_loss(model, samples: Sequence[HeldOutSample], sigmas: Sequence[float], seed: int,
                    micro_batch_size: int, patch_size: int, device, dtype: torch.dtype, dp_rank: int = 0,
                    dp_size: int = 1, dp_group=None) -> dict:
    """The mean flow-matching loss of `samples` at each sigma (see the module docstring). `model` is the
    unwrapped QwenImageMMDiT; every rank of the job calls this with the same samples. DP rank r takes
    samples r, r + dp_size, ...; each forward is one layout (latent and condition shapes), up to
    micro_batch_size samples. Returns {"val_loss": mean over sigmas, "val_loss_by_sigma": {sigma: mean},
    "val_loss_by_task": {task: mean over sigmas} (only when both tasks are held out), "val_samples": n,
    "val_s": seconds}, the same on every rank."""
    if not samples or not sigmas:
        raise ValueError(f"validation_loss needs samples and sigmas (got {len(samples)} and {len(sigmas)})")
    t0 = time.perf_counter()
    sigmas = [float(s) for s in sigmas]
    tasks = sorted({s.task for s in samples})  # every rank sees all samples: the same tasks, the same order
    by_layout = defaultdict(list)
    for s in samples[dp_rank::dp_size]:
        by_layout[s.layout].append(s)
    # per task: [per-sigma loss sums..., samples evaluated]; one all-reduce, one host sync
    totals = torch.zeros(len(tasks), len(sigmas) + 1, dtype=torch.float64, device=device)
    for layout in sorted(by_layout):
        group = by_layout[layout]
        row = tasks.index(group[0].task)
        for i in range(0, len(group), micro_batch_size):
            part = group[i:i + micro_batch_size]
            totals[row, :-1] += _loss_sums(model, part, sigmas, seed, patch_size, device, dtype)
            totals[row, -1] += len(part)
    if dp_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals, group=dp_group)
    totals = totals.cpu()
    everything = totals.sum(dim=0)
    n = int(everything[-1])
    by_sigma = {sigma: float(everything[k]) / n for k, sigma in enumerate(sigmas)}
    out = {"val_loss": sum(by_sigma.values()) / len(sigmas), "val_loss_by_sigma": by_sigma, "val_samples": n,
           "val_s": time.perf_counter() - t0}
    if len(tasks) > 1:
        out["val_loss_by_task"] = {t: float(totals[i, :-1].sum()) / len(sigmas) / float(totals[i, -1])
                                   for i, t in enumerate(tasks)}
    return out
