"""The forward stage: model, KV tensors, CUDA graphs (see ``stage.py``)."""
from stages.forward.stage import ForwardStage

__all__ = ["ForwardStage"]
