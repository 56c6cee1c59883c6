"""Evaluation tasks: a trained model, its data and queries, and its retraining recipe."""

from stride_jax.tasks._base import Task
from stride_jax.tasks._retrain import Trainer

__all__ = ["Task", "Trainer"]
