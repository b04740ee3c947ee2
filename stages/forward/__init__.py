"""The forward stage: model, KV tensors, CUDA graphs (see ``stage.py``); other TP ranks in ``rank.py``."""
from stages.forward.rank import ForwardRankStage
from stages.forward.stage import ForwardStage

__all__ = ["ForwardRankStage", "ForwardStage"]
