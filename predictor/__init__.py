"""Latency predictors for NAS search spaces: encodings, pre-training, samplers, few-shot adaptation."""

from predictor.model import LatencyPredictor, TrainConfig
from predictor.samplers import get_sampler
from predictor.spaces import InvalidArchitecture, SearchSpace, get_space

__all__ = ["InvalidArchitecture", "LatencyPredictor", "SearchSpace", "TrainConfig", "get_sampler", "get_space"]
