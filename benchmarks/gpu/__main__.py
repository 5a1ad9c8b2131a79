"""`python -m benchmarks.gpu`: see benchmarks/gpu/__init__.py and docs/performance.md."""
import os

# Before torch loads, so before CUDA can initialise: megatron's tensor-parallel communication overlap needs the
# device to run kernels in the order they were queued (one hardware work queue).
os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"

import sys  # noqa: E402

from benchmarks.gpu.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
