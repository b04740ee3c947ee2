"""Typed errors of model loading: each names the file, the field or the weight at fault.

Every problem a user can cause by pointing the server at the wrong place, or
at a checkpoint that does not match its config, is a ``ModelLoadError``
subclass whose message says what is wrong and what was expected. Nothing in
``models/`` raises a bare ``KeyError`` or a shape error from deep in torch.
"""
from __future__ import annotations


class ModelLoadError(Exception):
    """Base class: the model directory or its contents cannot be loaded."""


class ModelNotFoundError(ModelLoadError):
    """The model directory, its config.json or its weight files are missing."""


class ModelConfigError(ModelLoadError):
    """config.json is unreadable or a required field is missing or invalid."""


class UnsupportedArchitectureError(ModelLoadError):
    """config.architectures names a model class this runtime does not implement."""


class MissingWeightsError(ModelLoadError):
    """The checkpoint lacks tensors the model needs (named in the message)."""


class UnexpectedWeightsError(ModelLoadError):
    """The checkpoint holds tensors the model has no place for (named in the message)."""


class CorruptWeightsError(ModelLoadError):
    """A weight file cannot be read as safetensors (truncated, wrong format)."""


class WeightShapeError(ModelLoadError):
    """A checkpoint tensor's shape differs from what the config implies."""


def name_list(names: list[str] | set[str], limit: int = 8) -> str:
    """``a, b, c (+N more)``: short enough for a log line, complete enough to act on."""
    ordered = sorted(names)
    shown = ", ".join(ordered[:limit])
    rest = len(ordered) - limit
    return f"{shown} (+{rest} more)" if rest > 0 else shown
