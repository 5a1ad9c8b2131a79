"""The held-out split of a latent cache: which sample keys are kept out of training for validation.

A sample is held out iff a salted BLAKE2b hash of its key, mapped to [0, 1), is below the fraction. The
decision depends on the key alone -- not on shard layout, work-unit order, the rank, or Python's per-process
`hash()` randomisation -- so the training loader (which leaves these samples out, `holdout_fraction`) and the
validation loss (which reads only them) agree on every rank and in every run. Raising the fraction only adds
samples to the held-out set.
"""
from __future__ import annotations

import hashlib

# Changing the salt reshuffles every split: a new version, never an edit.
_SALT = b"megatron-qwen-image/holdout/v1"


def hash_unit(key: str) -> float:
    """The key's stable position in [0, 1): the top 53 bits of a salted 8-byte BLAKE2b digest."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=_SALT).digest()
    return (int.from_bytes(digest, "big") >> 11) / (1 << 53)


def check_fraction(fraction, name: str = "holdout_fraction") -> float:
    """`fraction` as a float in [0, 1); ValueError naming `name` otherwise (1 would hold out everything)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"{name}={fraction!r} must be a number in [0, 1)")
    return float(fraction)


def held_out(key: str, fraction: float) -> bool:
    """Whether the sample `key` belongs to the held-out `fraction` of the cache."""
    return hash_unit(key) < check_fraction(fraction)
