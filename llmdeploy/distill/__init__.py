"""Knowledge distillation: divergences between teacher and student next-token distributions, and
a teacher's distributions on the fly or as a memory-mapped top-k cache."""

from .losses import LOSSES, coarsen, distill_loss, divergence, kl_full, kl_topk
from .teacher import TopKCache

__all__ = ["LOSSES", "TopKCache", "coarsen", "distill_loss", "divergence", "kl_full", "kl_topk"]
