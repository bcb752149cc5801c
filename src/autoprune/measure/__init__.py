"""Honest measurement: MACs, parameters, latency, accuracy."""

from .accuracy import EvalResult, evaluate_batches
from .complexity import count_macs, count_params
from .latency import BACKENDS, Latency, available_backends, measure_latency, time_runner
from .latency_model import LatencyModel, build_latency_model
from .latency_table import TIMERS
from .profile import ModelProfile, profile_model

__all__ = [
    "BACKENDS",
    "TIMERS",
    "EvalResult",
    "Latency",
    "LatencyModel",
    "ModelProfile",
    "available_backends",
    "build_latency_model",
    "count_macs",
    "count_params",
    "evaluate_batches",
    "measure_latency",
    "profile_model",
    "time_runner",
]
