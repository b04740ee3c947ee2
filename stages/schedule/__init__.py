"""The schedule stage: queues, KV bookkeeping, radix cache, batching (see ``stage.py``)."""
from stages.schedule.model_info import ModelInfo
from stages.schedule.stage import ScheduleStage

__all__ = ["ModelInfo", "ScheduleStage"]
