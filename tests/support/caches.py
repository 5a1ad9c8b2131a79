"""Small finished latent caches for tests, written by the cache's own writer."""
from consumer.synthetic_data import SyntheticLatentBatches
from megatron_qwen_image.cache import CacheWriter


def small_cache(root) -> str:
    """32 samples in two buckets (64x64 and 48x80 pixels), text 3..9 tokens of width 64, two work units."""
    source = SyntheticLatentBatches(16, 0, 1, seed=5, text_dim=64, resolutions=[[64, 64], [48, 80]], text_len=[3, 9])
    for unit in range(2):
        batch = next(source)
        with CacheWriter(str(root), work_unit=f"unit-{unit}", latent_dtype="fp32", text_dtype="fp32") as writer:
            for key, latent, text, mask in zip(batch["keys"], batch["latents"], batch["text_embeds"], batch["text_mask"]):
                writer.add(key, latent, text[mask], caption="synthetic", source="test")
            writer.commit()
    return str(root)
