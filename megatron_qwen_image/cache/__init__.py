"""The latent cache: the one contract between producers (writers) and consumers (the loader).

Spec: docs/cache_format.md. Producers: `CacheWriter`; consumers: `BucketedLoader`; tools:
`python -m megatron_qwen_image.cache inspect|verify|cleanup|seal DIR`.
"""
from .buckets import ASPECT_RATIOS, BASE_RESOLUTIONS, bucket_for_size, buckets_for_base, resize_to_bucket
from .collate import collate
from .format import FORMAT_VERSION, SUPPORTED_VERSIONS, CacheFormatError, CorruptShardError
from .loader import BucketedLoader
from .manifest import seal
from .reader import CacheReader
from .writer import CacheSealedError, CacheWriter

__all__ = [
    "ASPECT_RATIOS", "BASE_RESOLUTIONS", "bucket_for_size", "buckets_for_base", "resize_to_bucket",
    "FORMAT_VERSION", "SUPPORTED_VERSIONS", "CacheFormatError", "CorruptShardError", "CacheSealedError",
    "BucketedLoader", "CacheReader", "CacheWriter", "collate", "seal",
]
