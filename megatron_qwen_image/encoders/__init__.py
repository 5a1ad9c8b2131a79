"""Encoders the producer runs and the pipeline parity tests prove: Qwen2.5-VL text features and
Qwen-Image VAE latents, both computed exactly as diffusers' QwenImagePipeline does, loaded from a
local Hugging Face-layout directory (released weights, or `python -m megatron_qwen_image.encoders.make_tiny`)."""
from megatron_qwen_image.encoders.text import MAX_TEXT_TOKENS, PROMPT_TEMPLATE, QwenTextEncoder, template_drop_index
from megatron_qwen_image.encoders.vae import QwenVAEEncoder, image_to_tensor

__all__ = ["QwenTextEncoder", "QwenVAEEncoder", "PROMPT_TEMPLATE", "MAX_TEXT_TOKENS", "template_drop_index",
           "image_to_tensor"]
