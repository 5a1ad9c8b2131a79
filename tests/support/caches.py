"""Small finished latent caches for tests, written by the cache's own writer."""
from consumer.synthetic_data import SyntheticLatentBatches
from megatron_qwen_image.cache import CacheWriter


def _commit(root, work_unit: str, batch: dict, key_prefix: str = "", base_resolution=None, categories=None) -> None:
    categories = categories or [None] * len(batch["keys"])
    with CacheWriter(str(root), work_unit=work_unit, latent_dtype="fp32", text_dtype="fp32",
                     base_resolution=base_resolution) as writer:
        for key, latent, text, mask, category in zip(batch["keys"], batch["latents"], batch["text_embeds"],
                                                     batch["text_mask"], categories, strict=True):
            writer.add(key_prefix + key, latent, text[mask], caption="synthetic", source="test",
                       meta=None if category is None else {"category": category})
        writer.commit()


def small_cache(root, resolutions=((64, 64), (48, 80)), seed: int = 5) -> str:
    """32 samples in the buckets of these [height, width] pixel sizes (by default two: 64x64 and 48x80), text
    3..9 tokens of width 64, two work units."""
    source = SyntheticLatentBatches(16, 0, 1, seed=seed, text_dim=64, resolutions=[list(r) for r in resolutions],
                                    text_len=[3, 9])
    for unit in range(2):
        _commit(root, f"unit-{unit}", next(source))
    return str(root)


def write_unit(root, unit: int, resolution: list[int], n: int = 16, base_resolution=None, categories=None) -> None:
    """One committed work unit of `n` synthetic samples of one bucket (text width = the tiny model's 64), keyed
    `unit-<unit>/...` (so several units in one cache have distinct keys); `categories`: each sample's meta
    "category" (None: none)."""
    _commit(root, f"unit-{unit}", next(SyntheticLatentBatches(n, 0, 1, seed=unit, text_dim=64,
                                                             resolutions=[resolution], text_len=[3, 9])),
            key_prefix=f"unit-{unit}/", base_resolution=base_resolution, categories=categories)


def write_edit_unit(root, unit: int, resolution: list[int], cond_resolution: list[int], n: int = 16,
                    base_resolution=None) -> None:
    """One committed work unit of `n` synthetic edit samples (keyed `unit-<unit>/...`): sample j's target is the
    synthetic sample j at `resolution`, its one condition image the same sample (same class and caption) at
    `cond_resolution`, mirrored left to right: a condition the target depends on."""
    def batch(res):
        return next(SyntheticLatentBatches(n, 0, 1, seed=unit, text_dim=64, resolutions=[res], text_len=[3, 9]))

    target, source = batch(resolution), batch(cond_resolution)
    with CacheWriter(str(root), work_unit=f"unit-{unit}", latent_dtype="fp32", text_dtype="fp32",
                     base_resolution=base_resolution) as writer:
        for key, latent, text, mask, cond in zip(target["keys"], target["latents"], target["text_embeds"],
                                                 target["text_mask"], source["latents"], strict=True):
            writer.add(f"unit-{unit}/{key}", latent, text[mask], caption="synthetic edit", source="test",
                       cond_latents=[cond.flip(-1)])
        writer.commit()
