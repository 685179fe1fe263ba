"""Knowledge distillation: the ``Distill`` recipe stage (one or several teachers, dynamic teacher
and data selection, on-policy data, full or LoRA training), divergences between teacher and student next-token distributions, and
a teacher's distributions on the fly or as a memory-mapped top-k cache."""

from .distill import (
    Distill,
    DistillReport,
    HiddenMatch,
    combine_teachers,
    confidence_weights,
    student_entropy,
)
from .losses import LOSSES, coarsen, distill_loss, divergence, kl_full, kl_topk
from .teacher import TopKCache

__all__ = ["LOSSES", "Distill", "DistillReport", "HiddenMatch", "TopKCache", "combine_teachers", "confidence_weights", "student_entropy", "coarsen", "distill_loss", "divergence", "kl_full", "kl_topk"]
