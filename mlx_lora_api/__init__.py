"""mlx-lora-api: a local REST service that trains LoRA adapters with mlx-lm and fuses them."""

__version__ = "0.1.0"
