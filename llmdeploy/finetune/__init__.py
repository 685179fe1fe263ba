"""Fine-tuning after compression: LoRA recovery fine-tuning (RFT)."""

from .lora import LoRAFinetune

__all__ = ["LoRAFinetune"]
