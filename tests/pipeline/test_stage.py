"""Stage base and StageLoop: step/emit/counters, own-thread running, idle loops that do not spin."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from pipeline.channel import in_thread_channel
from pipeline.process_channel import process_channel
from pipeline.thread_channel import thread_channel
from pipeline.harness import drive, wiring
from pipeline.stage import Outbox, Outboxes, Stage, StageLoop
from pipeline.messages import Abort
from tests.pipeline.toy_stages import AddAndHold, Forward, Item, ItemOutboxes


def items(count: int) -> list[Item]:
    return [Item(key=str(i), value=i) for i in range(count)]


def test_step_handles_inbox_then_ticks_and_counts() -> None:
    stage = AddAndHold("add", *wiring(Item, "out", "again"), amount=5, hold_steps=1)
    driver = drive(stage, *items(3))
    assert driver.step() == {"out": [], "again": []}  # handled and held one step
    assert stage.has_work()
    assert driver.step()["out"] == [Item(key=str(i), value=i + 5) for i in range(3)]
    assert not stage.has_work()
    assert stage.counters.messages_in == 3 and stage.counters.messages_out == 3
    assert stage.counters.steps == 2 and stage.counters.busy_s > 0


def test_step_takes_at_most_max_messages() -> None:
    stage = Forward("fwd", *wiring(Item, "out"))
    driver = drive(stage, *items(10))
    assert len(driver.step(max_messages=4)["out"]) == 4
    assert [m.value for m in driver.run_until_idle()["out"]] == list(range(4, 10))


def test_wiring_an_undeclared_door_names_the_record_and_its_doors() -> None:
    with pytest.raises(ValueError, match="ItemOutboxes has no door 'other'.*'again', 'out'"):
        Forward("fwd", *wiring(Item, "other"))


def test_a_door_refuses_a_message_of_another_type() -> None:
    stage = Forward("fwd", *wiring(Item, "out"))
    with pytest.raises(TypeError, match="stage 'fwd' put a Abort on its outbox 'out', which carries Item"):
        stage.outboxes.out.put(Abort(rid="x"))
    assert len(stage.outboxes.out.channel) == 0 and stage.counters.messages_out == 0


def test_step_never_overfills_an_in_thread_outbox() -> None:
    inbox = in_thread_channel("in", Item, 100)
    out = in_thread_channel("out", Item, 3)
    stage = Forward("fwd", inbox, {"out": out})
    for item in items(10):
        inbox.put(item)
    assert stage.step() == 3  # only as many as the outbox has room for
    assert stage.step() == 0
    out.drain(2)
    assert stage.step() == 2
    assert len(inbox) == 5


def test_malformed_message_from_a_process_border_is_counted_not_fatal() -> None:
    inbox = process_channel("in", Item, 4)
    inbox.put(Item(key="bad", value="not an int"))  # type: ignore[arg-type]
    inbox.put(Item(key="good", value=1))
    stage = Forward("fwd", inbox, {"out": in_thread_channel("out", Item, 8)})
    driver = drive(stage)
    outputs = [m for _ in range(50) for m in driver.step()["out"]]
    assert outputs == [Item(key="good", value=1)]
    assert stage.counters.messages_rejected == 1


def test_stage_on_its_own_thread_finishes_work_in_hand_on_stop() -> None:
    inbox, out = thread_channel("in", Item, 4), thread_channel("out", Item, 1000)
    stage = AddAndHold("add", inbox, {"out": out}, amount=1, hold_steps=3)
    stage.start()
    for item in items(100):
        inbox.put(item)  # blocks while the stage's inbox is full
    stage.stop(timeout=10.0)
    assert not stage.running
    assert [m.value for m in out.drain(1000)] == [i + 1 for i in range(100)]


def test_own_thread_stage_ends_when_its_inbox_closes_and_reports_failure() -> None:
    inbox = thread_channel("in", Item, 4)
    stage = Forward("fwd", inbox, {"out": thread_channel("out", Item, 4)})
    stage.start()
    inbox.close()
    deadline = time.monotonic() + 5
    while stage.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not stage.running
    stage.stop(timeout=1.0)

    failing = Forward("bad", thread_channel("in", Item, 4), {})
    failing.start()
    failing.inbox.put(Item(key="a", value=1))  # no "out" outbox: handle raises KeyError
    time.sleep(0.2)
    with pytest.raises(RuntimeError, match="'bad' failed"):
        failing.stop(timeout=5.0)


def test_stage_loop_runs_a_chain_and_sleeps_when_idle() -> None:
    entry, done = thread_channel("entry", Item, 64), thread_channel("done", Item, 1000)
    middle = in_thread_channel("middle", Item, 64)
    first = Forward("first", entry, {"out": middle})
    second = AddAndHold("second", middle, {"out": done}, amount=2, hold_steps=2)
    loop = StageLoop([first, second], idle_wait_s=2.0)  # long idle waits: a wake-up must come from the put
    loop.start()
    for item in items(50):
        entry.put(item)
    got = [done.get(timeout=5.0) for _ in range(50)]
    assert [m.value for m in got] == [i + 2 for i in range(50)]
    time.sleep(0.05)
    rounds_before = loop.rounds
    time.sleep(0.3)  # idle: the loop waits on its waker, not polling
    assert loop.rounds - rounds_before <= 2
    assert loop.idle and not loop.busy
    started_s = time.monotonic()
    entry.put(Item(key="late", value=0))  # the inbox's put wakes the loop at once
    assert done.get(timeout=5.0) == Item(key="late", value=2)
    assert time.monotonic() - started_s < 1.0  # far under the 2 s idle wait: the put woke it
    loop.stop(timeout=5.0)
    assert loop.totals() == (102, 102)


def test_wake_lets_a_worker_thread_rouse_an_idle_loop() -> None:
    class Background(Stage):
        """Hands each item to a thread; tick() emits results as they come back."""

        Outboxes = ItemOutboxes

        def __init__(self, name, inbox, outboxes) -> None:
            super().__init__(name, inbox, outboxes)
            self.results: list[Item] = []
            self.lock = threading.Lock()

        def handle(self, message: Item) -> None:
            def work() -> None:
                time.sleep(0.1)
                with self.lock:
                    self.results.append(message)
                self.wake()

            threading.Thread(target=work).start()

        def tick(self) -> None:
            with self.lock:
                ready, self.results = self.results, []
            for item in ready:
                self.outboxes.out.put(item)

    inbox, out = thread_channel("in", Item, 4), thread_channel("out", Item, 4)
    loop = StageLoop([Background("bg", inbox, {"out": out})], idle_wait_s=10.0)
    loop.start()
    inbox.put(Item(key="a", value=1))
    assert out.get(timeout=2.0) == Item(key="a", value=1)  # well before the 10 s idle wait
    loop.stop(timeout=15.0)


@dataclasses.dataclass(frozen=True)
class FanOutOutboxes(Outboxes):
    replicas: tuple[Outbox[Item], ...]
    log: Outbox[Item] | None = None


def test_a_door_family_is_wired_from_numbered_door_names() -> None:
    channels = {f"replicas.{i}": in_thread_channel(f"r{i}", Item, 4) for i in range(3)}
    record = FanOutOutboxes.wire(channels)
    assert [door.channel.name for door in record.replicas] == ["r0", "r1", "r2"]
    assert sorted(record.doors()) == ["replicas.0", "replicas.1", "replicas.2"]
    assert FanOutOutboxes.declared() == {"replicas": (Item, False, True), "log": (Item, False, False)}
    with pytest.raises(ValueError, match="replicas.0 .. replicas.1 must all be wired"):
        FanOutOutboxes.wire({"replicas.0": None, "replicas.2": None})
    with pytest.raises(ValueError, match="has no door 'replicas'"):
        FanOutOutboxes.wire({"replicas": None})
    with pytest.raises(TypeError, match="carries Item"):
        record.replicas[1].put(Abort(rid="x"))
