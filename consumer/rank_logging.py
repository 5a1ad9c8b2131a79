"""Python logging for the processes of a training run: every line on stderr, prefixed with who wrote it.

The libraries log through `logging` (the cache loader's "waiting for producers" line, its warnings about
unreadable or corrupt shards); without a handler Python would print only WARNING and above, unprefixed.
Here this project's loggers (`consumer`, `megatron_qwen_image`) get INFO on rank 0 and WARNING on the other
ranks (INFO on every rank with `logging.all_ranks=true`); everything else (megatron-core, torch) WARNING.
"""
from __future__ import annotations

import logging
import sys

PROJECT_LOGGERS = ("consumer", "megatron_qwen_image")


def configure_logging(label: str, verbose: bool) -> None:
    """One stderr handler whose lines start with `[label]` (e.g. "rank 3"); the project's loggers at INFO
    when `verbose`, else WARNING. Replaces any handler configured before."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{label}] %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
