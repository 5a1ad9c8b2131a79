"""Small finished latent caches for tests, written by the cache's own writer."""
from consumer.synthetic_data import SyntheticLatentBatches
from megatron_qwen_image.cache import CacheWriter


def small_cache(root, resolutions=((64, 64), (48, 80)), seed: int = 5) -> str:
    """32 samples in the buckets of these [height, width] pixel sizes (by default two: 64x64 and 48x80), text
    3..9 tokens of width 64, two work units."""
    source = SyntheticLatentBatches(16, 0, 1, seed=seed, text_dim=64, resolutions=[list(r) for r in resolutions],
                                    text_len=[3, 9])
    for unit in range(2):
        batch = next(source)
        with CacheWriter(str(root), work_unit=f"unit-{unit}", latent_dtype="fp32", text_dtype="fp32") as writer:
            for key, latent, text, mask in zip(batch["keys"], batch["latents"], batch["text_embeds"], batch["text_mask"]):
                writer.add(key, latent, text[mask], caption="synthetic", source="test")
            writer.commit()
    return str(root)
