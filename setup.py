"""megatron-qwen-image: producer/consumer training for Qwen-Image-class text-to-image models.

Pins: Python 3.11, torch 2.13.0 (CPU build here, a CUDA build on GPU clusters), megatron-core 0.16.1.
transformer-engine and apex are optional: the code runs without them and uses them when present.
"""
from setuptools import find_packages, setup

CORE = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "numpy>=1.26,<3",
    "pyarrow==26.0.1",
    "zlib-ng==1.1.0",  # SIMD CRC-32 for the latent cache (same values as zlib.crc32, which is the fallback)
    "safetensors==0.8.0",
    "pyyaml==6.0.3",
    "omegaconf==2.4.0",  # the config layer (structured configs; megatron_qwen_image/config.py)
    "tensorboard==2.21.0",
]
ENCODERS = [
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "diffusers==0.42.1",
    "accelerate==1.15.0",
]
PRODUCER = [
    "ray[data,default]==2.60.0",
    "webdataset==1.0.2",
    "pillow==13.0.0",
    "imagehash==4.3.2",
]
DEMO = ["matplotlib==3.11.2"]
# datasets: the tests write Hugging Face inputs with the real library (tests/test_producer_layouts.py)
TEST = ["pytest==9.2.0", "pytest-timeout==2.4.0", "datasets==5.2.0"]

setup(
    name="megatron-qwen-image",
    version="0.1.0",
    description="Open training system for Qwen-Image-class text-to-image models (Ray producer, Megatron-core consumer)",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["megatron_qwen_image*", "producer*", "consumer*", "launch*"]),
    include_package_data=True,
    install_requires=CORE + ENCODERS + PRODUCER + DEMO,
    extras_require={
        "test": TEST,
        # Used when present (GPU clusters); never required.
        "gpu": ["transformer-engine[pytorch]", "apex"],
    },
)
