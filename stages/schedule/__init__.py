"""The schedule stage: queues, KV bookkeeping, radix cache, batching (see ``stage.py``)."""
from pipeline.messages import ModelInfo
from stages.schedule.stage import ScheduleStage

__all__ = ["ModelInfo", "ScheduleStage"]
