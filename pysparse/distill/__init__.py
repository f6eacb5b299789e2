"""Knowledge distillation, cross-layer weight sharing and mixed precision (see trainer.py,
losses.py, sharing.py)."""
from .losses import (HiddenProjection, attention_kl, default_layer_map, embedding_loss,
                     hidden_mse, logit_kd, neighbour_kl, similarity_loss)
from .sharing import share_layers
from .trainer import LOSSES, DistillResult, distill

__all__ = ["distill", "DistillResult", "LOSSES", "share_layers", "logit_kd", "hidden_mse",
           "attention_kl", "embedding_loss", "similarity_loss", "neighbour_kl", "HiddenProjection",
           "default_layer_map"]
