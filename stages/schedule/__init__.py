"""The schedule stage: queues, KV bookkeeping, radix cache, batching (see ``stage.py``)."""
from stages.schedule.stage import ScheduleOutboxes, ScheduleStage

__all__ = ["ScheduleOutboxes", "ScheduleStage"]
