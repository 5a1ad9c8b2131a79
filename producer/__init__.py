"""The producer: a Ray application that reads image-caption shards, filters them, encodes them with the
Qwen-Image VAE and Qwen2.5-VL, and writes the bucketed latent cache. `python -m producer --help`;
docs/producer.md. Never imports the consumer; shared code lives in megatron_qwen_image/."""
