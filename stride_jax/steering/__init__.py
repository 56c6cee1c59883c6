"""Steering operators (basis network + per-subset coefficients), their sites, and the LM adapter."""

from stride_jax.steering._adapter import (LMFunctions, check_shapes, from_causal_lm, logit_shift,
                                          params_fingerprint)
from stride_jax.steering._operators import (Site, SteeringConfig, basis_features, default_layer,
                                            delta_logprob, delta_logprob_and_kl, init_steering, resolve_layer,
                                            shift, validate)

__all__ = ["LMFunctions", "Site", "SteeringConfig", "basis_features", "check_shapes", "default_layer",
           "delta_logprob", "delta_logprob_and_kl", "from_causal_lm", "init_steering", "logit_shift",
           "params_fingerprint", "resolve_layer", "shift", "validate"]
