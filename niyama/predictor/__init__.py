"""Batch-time predictors: "how long will a batch of this shape take?".

The scheduler only calls `batch_time(...)`; how the model was fitted stays
here. Profiles are named per model x hardware; see `profiles.py`.
"""

from .base import BatchTimePredictor
from .linear import TwoRegimeLinear
from .profiles import DEFAULT_PROFILE, PROFILES, load_profile
from .spline import LinearSpline

__all__ = ["BatchTimePredictor", "TwoRegimeLinear", "LinearSpline", "DEFAULT_PROFILE", "PROFILES", "load_profile"]
