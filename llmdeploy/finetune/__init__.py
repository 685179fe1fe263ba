"""Fine-tuning after compression: LoRA recovery fine-tuning (RFT)."""

from .full import FullFinetune
from .lora import LoRAFinetune

__all__ = ["FullFinetune", "LoRAFinetune"]
