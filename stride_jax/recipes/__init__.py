"""How base models are made: recipes that are pure functions of (config, data, seed).

Ground-truth retraining for the LDS evaluation re-runs these recipes on subsets of the training
rows, so they are kept deterministic and free of hidden state.
"""

from stride_jax.recipes.pretrain import (ArchConfig, Corpus, CorpusConfig, NonFiniteLossError,
                                         OptimConfig, PretrainConfig, PretrainResult, TrainResult,
                                         batch_schedule, build_corpus, evaluate_loss,
                                         format_loss_curve, make_optimizer, model_config_for,
                                         num_steps, pretrain, train_lm)

__all__ = ["ArchConfig", "Corpus", "CorpusConfig", "NonFiniteLossError", "OptimConfig",
           "PretrainConfig", "PretrainResult", "TrainResult", "batch_schedule", "build_corpus",
           "evaluate_loss", "format_loss_curve", "make_optimizer", "model_config_for", "num_steps",
           "pretrain", "train_lm"]
