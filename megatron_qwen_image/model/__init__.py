"""The Qwen-Image MMDiT on megatron-core (see docs/model.md)."""
from .block import QwenImageBlock, get_qwen_image_block_spec
from .config import QwenImageConfig
from .mmdit import QwenImageMMDiT
from .packing import pack_latents, unpack_latents

__all__ = ["QwenImageConfig", "QwenImageMMDiT", "QwenImageBlock", "get_qwen_image_block_spec",
           "pack_latents", "unpack_latents"]
