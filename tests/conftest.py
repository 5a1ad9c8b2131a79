import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir():
    """The tiny random encoders and pipeline parts of make_tiny (built once per machine, then reused)."""
    from megatron_qwen_image.encoders.make_tiny import ensure_tiny

    return ensure_tiny()


@pytest.fixture(scope="session")
def pipe(tiny_dir):
    """diffusers' QwenImagePipeline on the tiny encoders (the reference the encoder tests compare with)."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(tiny_dir)
