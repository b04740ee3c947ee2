"""The data-parallel router alone through the harness: the three policies, siblings, aborts, flushes, stats."""
from __future__ import annotations

import pytest

from pipeline.config import ServerArgs
from pipeline.harness import drive, wiring
from pipeline.messages import Abort, EngineStats, FlushCache, RouterInbox, SamplingParams, TokenizedRequest
from stages import router as router_module
from stages.router import PrefixTree, RouterStage


def make_router(method: str = "round_robin", dp_size: int = 2) -> RouterStage:
    doors = [f"replicas.{k}" for k in range(dp_size)]
    inbox, outboxes = wiring(RouterInbox, *doors, "stats")
    args = ServerArgs(model_path="/nonexistent", dp_size=dp_size, load_balance_method=method)
    return RouterStage(args, inbox, outboxes, dp_size=dp_size)


def request(rid: str, input_ids: list[int] | None = None, *, parent_rid: str | None = None,
            index: int = 0) -> TokenizedRequest:
    return TokenizedRequest(rid=rid, parent_rid=parent_rid or rid, index=index,
                            input_ids=input_ids if input_ids is not None else [1, 2, 3], sampling=SamplingParams())


def stats(dp_rank: int, running: int = 0, queued: int = 0) -> EngineStats:
    return EngineStats(time_s=1.0, num_running_reqs=running, num_queue_reqs=queued, token_usage=0.0,
                       cache_hit_rate=0.0, gen_throughput=0.0, max_total_num_tokens=100, dp_rank=dp_rank)


def rids_per_replica(outputs: dict[str, list], dp_size: int = 2) -> list[list[str]]:
    return [[m.rid for m in outputs[f"replicas.{k}"] if isinstance(m, TokenizedRequest)] for k in range(dp_size)]


def test_round_robin_alternates():
    router = make_router("round_robin", dp_size=3)
    outputs = drive(router, *(request(f"r{i}") for i in range(7))).run_until_idle()
    assert rids_per_replica(outputs, 3) == [["r0", "r3", "r6"], ["r1", "r4"], ["r2", "r5"]]


def test_shortest_queue_follows_stats_and_in_flight_counts():
    router = make_router("shortest_queue")
    driver = drive(router, stats(0, running=3, queued=1), stats(1, running=1))
    driver.run_until_idle()
    # replica 1 reports 1 request, replica 0 reports 4: the next three go to 1 (1, 2, 3 in flight there), then
    # the tie at 4 goes to the lowest index, and so on.
    out = driver.feed(*(request(f"r{i}") for i in range(5))).run_until_idle()
    assert rids_per_replica(out) == [["r3"], ["r0", "r1", "r2", "r4"]]
    assert router.loads() == [5, 5]
    # a new snapshot replaces the estimate: replica 1 finished everything, replica 0 is still busy
    out = driver.feed(stats(1), stats(0, running=5), request("r5"), request("r6")).run_until_idle()
    assert rids_per_replica(out) == [[], ["r5", "r6"]]


def test_cache_aware_keeps_shared_prefixes_together_and_spreads_the_rest():
    router = make_router("cache_aware")
    system = list(range(100, 164))  # a long shared prompt prefix
    out = drive(router,
                request("a", system + [1, 2]),  # tie on load: replica 0
                request("b", [7, 8, 9]),  # no match anywhere: shortest queue, replica 1
                request("c", system + [3]),  # 64/65 of it is in replica 0's tree
                request("d", system + [4, 5, 6]),
                request("e", [9, 9, 9, 9])).run_until_idle()  # unrelated: by load (0 has 3, 1 has 1)
    assert rids_per_replica(out) == [["a", "c", "d"], ["b", "e"]]


def test_cache_aware_needs_half_the_prompt_matched():
    router = make_router("cache_aware")
    out = drive(router, request("a", [1, 2, 3, 4]), request("b", [1, 2, 7, 8, 9])).run_until_idle()
    assert rids_per_replica(out) == [["a"], ["b"]]  # 2 of 5 matched (< 0.5): shortest queue instead
    out = drive(router, request("c", [1, 2, 3, 5])).run_until_idle()
    assert rids_per_replica(out) == [["c"], []]  # 3 of 4 matched on replica 0, though 0 has more load


def test_cache_aware_balances_first_when_load_is_lopsided():
    router = make_router("cache_aware")
    driver = drive(router, request("a", [1, 2, 3, 4]))
    driver.run_until_idle()
    out = driver.feed(stats(0, running=40), stats(1, running=2), request("b", [1, 2, 3, 4])).run_until_idle()
    assert rids_per_replica(out) == [[], ["b"]]


def test_siblings_of_one_parent_stay_together():
    router = make_router("round_robin")
    sequences = [request(f"p.{i}", parent_rid="p", index=i) for i in range(3)]
    out = drive(router, request("x"), *sequences, request("y")).run_until_idle()
    assert rids_per_replica(out) == [["x", "y"], ["p.0", "p.1", "p.2"]]


def test_abort_reaches_only_the_replica_holding_the_request():
    router = make_router("round_robin")
    driver = drive(router, request("a"), request("p.0", parent_rid="p"), request("p.1", parent_rid="p", index=1))
    driver.run_until_idle()
    out = driver.feed(Abort(rid="p.1", reason="stop"), Abort(rid="p"), Abort(rid="a")).run_until_idle()
    assert out["replicas.0"] == [Abort(rid="a")]
    assert out["replicas.1"] == [Abort(rid="p.1", reason="stop"), Abort(rid="p")]
    assert "a" not in router.routes and "p" not in router.routes  # forgotten on abort
    out = driver.feed(Abort(rid="a")).run_until_idle()  # no longer known: every replica (a no-op there)
    assert out["replicas.0"] == out["replicas.1"] == [Abort(rid="a")]


def test_unknown_abort_goes_everywhere():
    out = drive(make_router(dp_size=3), Abort(rid="never-seen")).run_until_idle()
    assert [out[f"replicas.{k}"] for k in range(3)] == [[Abort(rid="never-seen")]] * 3


def test_flush_cache_reaches_every_replica_and_resets_the_trees():
    router = make_router("cache_aware")
    prompt = list(range(50))
    driver = drive(router, request("a", prompt))
    assert rids_per_replica(driver.run_until_idle()) == [["a"], []]
    assert router.trees[0].match(prompt) == 50
    flush = FlushCache(request_id="flush-1")
    out = driver.feed(flush).run_until_idle()
    assert out["replicas.0"] == out["replicas.1"] == [flush]
    assert [tree.num_tokens for tree in router.trees] == [0, 0]
    out = driver.feed(stats(0, running=1), stats(1), request("c", prompt)).run_until_idle()
    assert rids_per_replica(out) == [[], ["c"]]  # no memory of "a": c goes by load


def test_engine_stats_are_relayed_unchanged():
    router = make_router(dp_size=2)
    snapshots = [stats(1, running=2), stats(0, queued=3)]
    out = drive(router, *snapshots).run_until_idle()
    assert out["stats"] == snapshots and out["replicas.0"] == out["replicas.1"] == []
    assert router.reported_load == [3, 2]


def test_wrong_door_count_is_a_clear_error():
    inbox, outboxes = wiring(RouterInbox, "replicas.0", "replicas.1", "stats")
    args = ServerArgs(model_path="/nonexistent")
    with pytest.raises(ValueError, match=r"dp_size=3 needs doors replicas.0 .. replicas.2, but 2"):
        RouterStage(args, inbox, outboxes, dp_size=3)
    inbox, outboxes = wiring(RouterInbox, "replicas.0", "replicas.2", "stats")
    with pytest.raises(ValueError, match="must all be wired"):
        RouterStage(args, inbox, outboxes, dp_size=2)


def test_route_table_is_bounded(monkeypatch):
    monkeypatch.setattr(router_module, "MAX_ROUTED_RIDS", 4)
    router = make_router()
    drive(router, *(request(f"r{i}") for i in range(10))).run_until_idle()
    assert list(router.routes) == ["r6", "r7", "r8", "r9"]


def test_prefix_tree_matches_splits_and_evicts_least_recently_used():
    tree = PrefixTree(token_budget=10)
    tree.insert([1, 2, 3, 4])
    tree.insert([1, 2, 5])  # splits the edge after [1, 2]
    assert (tree.match([1, 2, 3, 9]), tree.match([1, 2, 5, 6]), tree.match([7]), tree.num_tokens) == (3, 3, 0, 5)
    tree.match([1, 2, 3])  # [3, 4] is now more recent than [5]
    tree.evict(4)
    assert tree.match([1, 2, 5]) == 2 and tree.match([1, 2, 3, 4]) == 4 and tree.num_tokens == 4
    tree.insert([8] * 8)  # 12 tokens > 10: trimmed to 9 at most, least recently used leaves first
    assert tree.num_tokens <= 9 and tree.match([8] * 8) == 8 and tree.match([1, 2, 3, 4]) == 0
