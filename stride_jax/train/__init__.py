"""Operator training: the activation cache, the joint objective, resumable checkpoints."""

from stride_jax.train._cache import ActivationCache, build_cache, check_rows_fit
from stride_jax.train._closed_form import (ClosedFormConfig, OperatorFactors,
                                           closed_form_scores, compute_dtype, fit_factors,
                                           operator_gradients, query_losses, query_terms,
                                           reader_lm, self_scores, token_scores)
from stride_jax.train._checkpoint import CheckpointMismatchError, OperatorCheckpointer
from stride_jax.train._train import (Indices, NonFiniteOperatorLossError, OperatorState,
                                     OperatorTrainConfig, Rows, TrainOutput, gather_rows,
                                     make_sampler, padded_members, responses, subset_schedule,
                                     train_operators, validate)

__all__ = ["ActivationCache", "CheckpointMismatchError", "ClosedFormConfig", "OperatorFactors",
           "closed_form_scores", "compute_dtype", "fit_factors", "operator_gradients",
           "query_losses", "query_terms", "reader_lm", "self_scores", "token_scores", "Indices",
           "NonFiniteOperatorLossError",
           "OperatorCheckpointer", "OperatorState", "OperatorTrainConfig", "Rows", "TrainOutput",
           "build_cache", "check_rows_fit", "gather_rows", "make_sampler", "padded_members",
           "responses", "subset_schedule", "train_operators", "validate"]
