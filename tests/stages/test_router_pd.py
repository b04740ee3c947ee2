"""The router under prefill/decode disaggregation, alone through the harness: engines that die.

An ``EngineDown`` makes the router fail (ErrorOutput, naming the engine) every
sequence that was on the dead engine (a prefill engine: those not handed off
yet; a decode engine: those handed to it), route new requests around it, stop
sending it aborts and flushes, and pass the notice to every survivor; once a
role has no engine left, a new request gets a 503.
"""
from __future__ import annotations

from pipeline.config import ServerArgs
from pipeline.harness import drive, wiring
from pipeline.messages import (Abort, EngineDown, ErrorOutput, FlushCache, HandedOff, PDRouterInbox, SamplingParams,
                               TokenizedRequest)
from stages.router import RouterStage


def make_router(num_prefill: int = 2, num_decode: int = 2) -> RouterStage:
    doors = ([f"replicas.{k}" for k in range(num_prefill)] + [f"peers.{k}" for k in range(num_prefill)]
             + [f"decoders.{j}" for j in range(num_decode)] + ["stats", "errors.0"])
    inbox, outboxes = wiring(PDRouterInbox, *doors)
    args = ServerArgs(model_path="/nonexistent", load_balance_method="round_robin")
    return RouterStage(args, inbox, outboxes, dp_size=num_prefill)


def request(rid: str, parent_rid: str | None = None, index: int = 0) -> TokenizedRequest:
    return TokenizedRequest(rid=rid, parent_rid=parent_rid or rid, index=index, input_ids=[1, 2, 3],
                            sampling=SamplingParams())


def down(role: str, index: int, rank: int) -> EngineDown:
    return EngineDown(role=role, index=index, rank=rank, reason="killed")


def test_a_dead_decode_engine_fails_what_was_handed_to_it_and_only_that():
    router = make_router()
    driver = drive(router, request("a"), request("b"), request("c"), request("d"),
                   HandedOff(rid="a", parent_rid="a", decode=0), HandedOff(rid="b", parent_rid="b", decode=1))
    driver.run_until_idle()
    out = driver.feed(down("decode", 0, 2)).run_until_idle()
    assert [(e.rid, e.status_code) for e in out["errors.0"]] == [("a", 500)]
    assert "decode engine 0 died" in out["errors.0"][0].message
    assert out["decoders.0"] == [] and out["decoders.1"] == [down("decode", 0, 2)]
    assert out["peers.0"] == out["peers.1"] == [down("decode", 0, 2)]
    # aborts and flushes skip the dead engine; a late handoff notice to it fails that request too
    out = driver.feed(Abort(rid="c"), FlushCache(request_id="f"),
                      HandedOff(rid="d", parent_rid="d", decode=0)).run_until_idle()
    assert out["decoders.0"] == [] and len(out["decoders.1"]) == 2
    assert [e.rid for e in out["errors.0"]] == ["d"]
    assert router.telemetry()["pd_decode_engines_up"] == 1.0 and router.telemetry()["pd_down.decode.0"] == 1.0


def test_a_dead_prefill_engine_fails_its_unhanded_requests_and_is_routed_around():
    router = make_router()
    driver = drive(router, request("p.0", "p"), request("p.1", "p", index=1), request("q"), request("r"))
    first = driver.run_until_idle()
    assert [m.rid for m in first["replicas.0"]] == ["p.0", "p.1", "r"]  # siblings follow the first
    driver.feed(HandedOff(rid="p.0", parent_rid="p", decode=1)).run_until_idle()
    out = driver.feed(down("prefill", 0, 0), request("s"), request("t"), Abort(rid="zzz")).run_until_idle()
    assert sorted(e.rid for e in out["errors.0"]) == ["p", "r"]  # p.1 was still there; q is on prefill 1
    assert out["peers.0"] == [] and out["peers.1"] == [down("prefill", 0, 0)]
    assert [m.rid for m in out["replicas.1"] if isinstance(m, TokenizedRequest)] == ["s", "t"]
    assert [m for m in out["replicas.0"]] == []  # the unknown rid's abort skips the dead engine too


def test_no_engine_of_a_role_left_refuses_new_requests_with_503():
    router = make_router(num_prefill=1, num_decode=1)
    out = drive(router, down("decode", 0, 1), request("x")).run_until_idle()
    assert [(e.rid, e.status_code, e.error_type) for e in out["errors.0"]] == [("x", 503, "server_unavailable")]
    assert "no decode engine is up" in out["errors.0"][0].message
    assert out["replicas.0"] == []
