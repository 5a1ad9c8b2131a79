"""Encoders the producer runs and the pipeline parity tests prove: Qwen2.5-VL text features (`text.py`) and
Qwen-Image VAE latents and decoding (`vae.py`), both computed exactly as diffusers' QwenImagePipeline does,
loaded from a local Hugging Face-layout directory (`local_dir.py`; released weights, or
`python -m megatron_qwen_image.encoders.make_tiny`).

The package imports nothing itself: `text.py` loads transformers and `vae.py` diffusers (seconds of start-up),
which a process that only needs `local_dir`'s checks, or only the VAE, should not pay for.
"""
