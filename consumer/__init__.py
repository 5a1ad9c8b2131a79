"""The consumer: Megatron-core training on the latent cache (consumer.train)."""
from megatron_qwen_image.megatron_compat import quiet_known_warnings

quiet_known_warnings()  # before megatron-core is first imported by any consumer module
