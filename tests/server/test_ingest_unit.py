"""The ingest stage in-process against a fake engine: overload 503, abort, errors mid-stream, health, info."""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from pipeline.channel import Channel
from pipeline.thread_channel import thread_channel
from pipeline.config import ServerArgs
from pipeline.messages import (Abort, EngineStats, ErrorOutput, FinishReason, GenerateRequest, IngestInbox,
                               ProcessCounters, ServerInfo, TextOutput, TokenizeInbox)
from stages.ingest import IngestStage, ServerContext, build_app


SERVER_INFO = ServerInfo(torch_version="2.x", triton_version="3.x", device_name="cpu")


class FakeTokenizer:
    bos_token_id = 0

    def __len__(self) -> int:
        return 50

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"<{i}>" for i in ids)


def text_output(request: GenerateRequest, index: int, text: str, finish: str | None) -> TextOutput:
    n = request.sampling.n
    return TextOutput(rid=request.rid if n == 1 else f"{request.rid}.{index}", parent_rid=request.rid, index=index,
                      text_delta=text, token_ids_delta=[7], prompt_tokens=3, completion_tokens=1,
                      finish_reason=FinishReason(type=finish) if finish else None)


TOOL_TEXT = '<think>weather?</think>Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


async def fake_engine(requests, outputs, seen: list, mode: str) -> None:
    """Answer each GenerateRequest: 'echo' -> one token per sequence ('slow': after 0.3 s, 'hold-first': all
    but the first message); 'hold' -> nothing; 'fail' -> error."""
    while True:
        message = await requests.aget()
        seen.append(message)
        if not isinstance(message, GenerateRequest) or mode == "hold" or (mode == "hold-first" and len(seen) == 1):
            continue
        if mode == "slow":
            await asyncio.sleep(0.3)
        for index in range(message.sampling.n):
            if mode == "tool":
                pieces = [TOOL_TEXT[i:i + 5] for i in range(0, len(TOOL_TEXT), 5)]
                for position, piece in enumerate(pieces):
                    outputs.put(text_output(message, index, piece, "stop" if position == len(pieces) - 1 else None))
                continue
            if mode == "fail":
                outputs.put(text_output(message, index, "par", None))
                outputs.put(ErrorOutput(rid=message.rid, status_code=500, message="engine fell over",
                                        error_type="internal_error"))
                break
            outputs.put(text_output(message, index, "ok", "length"))


def fake_ingest(**arg_overrides) -> tuple[ServerContext, Channel, Channel]:
    """(a ready ServerContext whose ingest stage has the fake tokenizer, its requests channel, its outputs channel)."""
    args = ServerArgs(model_path="/nonexistent", served_model_name="fake", **arg_overrides)
    requests = thread_channel("tokenize", TokenizeInbox, 64)
    outputs = thread_channel("ingest", IngestInbox, 64)
    ingest = IngestStage(args, outputs, {"out": requests}, tokenizer=FakeTokenizer(), server_info=SERVER_INFO)
    ctx = ServerContext(args, ingest)
    ctx.ready = True
    return ctx, requests, outputs


async def with_app(mode: str, test, **arg_overrides) -> list:
    ctx, requests, outputs = fake_ingest(**arg_overrides)
    seen: list = []
    tasks = [asyncio.ensure_future(ctx.ingest.pump()), asyncio.ensure_future(fake_engine(requests, outputs, seen, mode))]
    client = TestClient(TestServer(build_app(ctx)))
    await client.start_server()
    try:
        await test(client, ctx)
    finally:
        await client.close()
        for task in tasks:
            task.cancel()
    return seen


def run(mode: str, test, **arg_overrides) -> list:
    return asyncio.run(with_app(mode, test, **arg_overrides))


def test_echo_engine_round_trip():
    async def test(client, ctx):
        response = await client.post("/v1/completions", json={"prompt": "x", "n": 3})
        body = await response.json()
        assert response.status == 200 and [c["text"] for c in body["choices"]] == ["ok"] * 3
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                                 "prompt_tokens_details": {"cached_tokens": 0}}
        assert ctx.ingest.streams == {}

    seen = run("echo", test)
    assert isinstance(seen[0], GenerateRequest) and seen[0].sampling.n == 3 and seen[0].sampling.max_new_tokens == 16


def test_overload_is_503_and_abort_request_ends_stream():
    async def test(client, ctx):
        held = asyncio.ensure_future(client.post("/v1/completions", json={"prompt": "x", "rid": "first"}))
        while "first" not in ctx.ingest.labels:
            await asyncio.sleep(0.01)
        response = await client.post("/v1/completions", json={"prompt": "y"})
        body = await response.json()
        assert response.status == 503 and "overloaded" in body["error"]["message"]
        response = await client.post("/abort_request", json={"rid": "first"})
        assert response.status == 200 and (await response.json())["aborted"] == ["first"]
        first = await (await held).json()
        assert first["choices"][0]["finish_reason"] == "abort"
        response = await client.post("/abort_request", json={"rid": "first"})
        assert response.status == 404

    seen = run("hold", test, max_running_requests=1, max_queued_requests=0)
    assert Abort(rid=seen[0].rid) in seen and seen[0].rid != "first"  # the server's id, not the label


def test_engine_error_mid_stream_is_an_error_event():
    async def test(client, ctx):
        response = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "stream": True})
        assert response.status == 200
        events = [line.strip() async for line in response.content if line.startswith(b"data:")]
        assert events[-1] == b"data: [DONE]"
        error = json.loads(events[-2][5:])["error"]
        assert error["code"] == 500 and "engine fell over" in error["message"]
        whole = await client.post("/v1/completions", json={"prompt": "x"})
        assert whole.status == 500 and (await whole.json())["error"]["type"] == "internal_error"

    run("fail", test)


def test_cancelled_handler_aborts_request():
    async def test(client, ctx):
        task = asyncio.ensure_future(client.post("/v1/completions", json={"prompt": "x", "rid": "gone",
                                                                          "stream": True}))
        while "gone" not in ctx.ingest.labels:
            await asyncio.sleep(0.01)
        task.cancel()  # the client goes away
        for _ in range(200):
            if not ctx.ingest.streams:
                break
            await asyncio.sleep(0.01)
        assert ctx.ingest.streams == {} and ctx.ingest.labels == {}

    seen = run("hold", test)
    assert Abort(rid=seen[0].rid) in seen


@pytest.mark.parametrize("ready, status", [(False, 503), (True, 200)])
def test_health_follows_readiness(ready, status):
    async def test(client, ctx):
        ctx.ready = ready
        response = await client.get("/health")
        assert response.status == status

    run("echo", test)


def test_reasoning_and_tool_call_parsers():
    async def test(client, ctx):
        body = {"messages": [{"role": "user", "content": "weather in Paris?"}], "tools": TOOLS}
        whole = await (await client.post("/v1/chat/completions", json=body)).json()
        choice = whole["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["reasoning_content"] == "weather?"
        assert choice["message"]["content"] == "Checking."
        [call] = choice["message"]["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        response = await client.post("/v1/chat/completions", json=dict(body, stream=True))
        events = [json.loads(line[5:]) async for line in response.content
                  if line.startswith(b"data:") and b"[DONE]" not in line]
        deltas = [e["choices"][0]["delta"] for e in events]
        assert "".join(d["reasoning_content"] or "" for d in deltas) == "weather?"
        assert "".join(d.get("content", "") for d in deltas) == "Checking."
        arguments = "".join(c["function"]["arguments"] for d in deltas for c in d.get("tool_calls", []))
        assert arguments == '{"city": "Paris"}'
        assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
        bad = await client.post("/v1/chat/completions", json=dict(body, tool_choice={
            "type": "function", "function": {"name": "nope"}}))
        assert bad.status == 400 and "nope" in (await bad.json())["error"]["message"]

    seen = run("tool", test, tool_call_parser="qwen25", reasoning_parser="qwen3")
    assert seen[0].tools == TOOLS


def test_forced_tool_choice_constrains_output():
    async def test(client, ctx):
        body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
        assert (await client.post("/v1/chat/completions", json=body)).status == 200

    [request] = run("echo", test)
    assert json.loads(request.sampling.json_schema) == TOOLS[0]["function"]["parameters"]


def test_server_info_and_metrics_carry_process_counters():
    counters = {"engine": ProcessCounters(process="engine", time_s=1.0, stages={
                    "forward": {"messages_in": 7.0, "messages_out": 7.0, "busy_s": 0.5, "steps": 9.0}}),
                "main": ProcessCounters(process="main", time_s=1.0, stages={
                    "tokenize": {"messages_in": 2.0, "queue_depth": 1.0}})}

    async def test(client, ctx):
        info = await (await client.get("/get_server_info")).json()
        assert info["stage_counters"] == {}
        assert info["device_name"] == "cpu" and info["torch_version"] == "2.x"
        for message in counters.values():
            ctx.ingest.handle(message)
        ctx.ingest.handle(ProcessCounters(process="engine", time_s=2.0, stages={"forward": {"messages_in": 8.0}}))
        info = await (await client.get("/get_server_info")).json()
        assert info["stage_counters"] == {"forward": {"messages_in": 8.0}, "tokenize": counters["main"].stages["tokenize"]}
        model = await (await client.get("/get_model_info")).json()
        assert model["vocab_size"] == 50
        text = await (await client.get("/metrics")).text()
        assert 'stagewise:stage_messages_in_total{process="engine",stage="forward"} 8.0' in text
        assert 'stagewise:channel_queue_depth{channel="tokenize",process="main"} 1.0' in text

    run("echo", test, enable_metrics=True)


def engine_stats(dp_rank: int, running: int, queued: int, usage: float, max_tokens: int,
                 time_s: float) -> EngineStats:
    return EngineStats(time_s=time_s, num_running_reqs=running, num_queue_reqs=queued, token_usage=usage,
                       cache_hit_rate=0.5 * dp_rank, gen_throughput=10.0, max_total_num_tokens=max_tokens,
                       dp_rank=dp_rank)


def test_server_info_and_metrics_report_each_data_parallel_replica():
    replica1 = engine_stats(1, running=2, queued=1, usage=0.5, max_tokens=300, time_s=2.0)
    replica0_old = engine_stats(0, running=9, queued=9, usage=0.0, max_tokens=100, time_s=1.0)
    replica0 = engine_stats(0, running=3, queued=0, usage=0.25, max_tokens=100, time_s=3.0)

    async def test(client, ctx):
        info = await (await client.get("/get_server_info")).json()
        assert info["engine_stats"] is None and info["engine_stats_per_dp_rank"] == []
        assert info["max_total_num_tokens"] is None
        for message in (replica1, replica0_old, replica0):  # the latest of each replica counts
            ctx.ingest.handle(message)
        info = await (await client.get("/get_server_info")).json()
        assert [s["dp_rank"] for s in info["engine_stats_per_dp_rank"]] == [0, 1]
        assert info["engine_stats_per_dp_rank"][0]["num_running_reqs"] == 3
        assert info["engine_stats_per_dp_rank"][1]["token_usage"] == 0.5
        assert info["max_total_num_tokens"] == 400
        total = info["engine_stats"]
        assert (total["num_running_reqs"], total["num_queue_reqs"], total["max_total_num_tokens"]) == (5, 1, 400)
        assert total["token_usage"] == (0.25 * 100 + 0.5 * 300) / 400 and total["time_s"] == 2.0
        assert total["gen_throughput"] == 20.0 and total["dp_rank"] == -1
        text = await (await client.get("/metrics")).text()
        assert 'stagewise:num_running_reqs{dp_rank="0",model_name="fake"} 3.0' in text
        assert 'stagewise:num_running_reqs{dp_rank="1",model_name="fake"} 2.0' in text
        assert 'stagewise:max_total_num_tokens{dp_rank="1",model_name="fake"} 300.0' in text
        assert 'stagewise:cache_hit_rate{dp_rank="1",model_name="fake"} 0.5' in text

    run("echo", test, enable_metrics=True, dp_size=2)


def test_one_replica_keeps_its_snapshot_and_unlabelled_series():
    stats = engine_stats(0, running=1, queued=2, usage=0.125, max_tokens=64, time_s=5.0)

    async def test(client, ctx):
        ctx.ingest.handle(stats)
        info = await (await client.get("/get_server_info")).json()
        assert info["engine_stats"] == info["engine_stats_per_dp_rank"][0] and info["engine_stats"]["dp_rank"] == 0
        assert info["max_total_num_tokens"] == 64 and ctx.ingest.engine_stats is stats
        text = await (await client.get("/metrics")).text()
        assert 'stagewise:num_queue_reqs{model_name="fake"} 2.0' in text and "dp_rank" not in text

    run("echo", test, enable_metrics=True)


def test_replayed_handler_messages_go_out_as_sent():
    args = ServerArgs(model_path="/nonexistent")
    requests = thread_channel("tokenize", TokenizeInbox, 8)
    ingest = IngestStage(args, thread_channel("ingest", IngestInbox, 8), {"out": requests},
                         tokenizer=FakeTokenizer(), server_info=SERVER_INFO)
    ingest.replay_input("http", Abort(rid="r"))
    assert requests.drain(8) == [Abort(rid="r")] and ingest.counters.messages_out == 1
    with pytest.raises(TypeError, match="side door"):
        ingest.replay_input("elsewhere", Abort(rid="r"))


def test_one_health_generate_probe_at_a_time():
    """/health_generate needs no key: concurrent calls share one probe generation instead of one each."""
    async def test(client, ctx):
        responses = await asyncio.gather(*(client.get("/health_generate") for _ in range(20)))
        assert [r.status for r in responses] == [200] * 20
        again = await client.get("/health_generate")  # the probe ended: the next call runs a new one
        assert again.status == 200

    seen = run("slow", test)
    assert len([m for m in seen if isinstance(m, GenerateRequest)]) == 2


def test_client_rids_are_labels_and_a_clashing_batch_leaves_nothing():
    async def test(client, ctx):
        held = asyncio.ensure_future(client.post("/generate", json={"text": "x", "rid": "dup-1"}))
        while "dup-1" not in ctx.ingest.labels:
            await asyncio.sleep(0.01)
        for rid in ("dup-1", "dup-1"):
            response = await client.post("/generate", json={"text": ["a", "b"], "rid": rid})
            assert response.status == 400 and (await response.json())["error"]["param"] == "rid"
        response = await client.post("/generate", json={"text": ["a", "b"], "rid": "dup"})  # "dup-1" shown, not taken
        assert response.status == 200 and [item["meta_info"]["id"] for item in await response.json()] == [
            "dup-0", "dup-1"]
        assert list(ctx.ingest.labels) == ["dup-1"] and ctx.ingest.num_sequences_in_flight == 1
        assert (await client.post("/abort_request", json={"rid": "dup-1"})).status == 200
        await held
        assert (ctx.ingest.streams, ctx.ingest.labels, ctx.ingest.num_sequences_in_flight) == ({}, {}, 0)

    seen = run("hold-first", test)
    requests = [m for m in seen if isinstance(m, GenerateRequest)]
    assert len(requests) == 3 and not any(r.rid.startswith("dup") for r in requests)
    assert len({r.rid for r in requests}) == 3


@pytest.mark.parametrize("flag, env, file_text, expected", [
    ("flag-key", "env-key", "file-key\n", "flag-key"), ("", "env-key", "file-key\n", "env-key"),
    ("", "", "file-key\nignored\n", "file-key"), ("", "", None, "")])
def test_api_key_sources(tmp_path, monkeypatch, flag, env, file_text, expected):
    from stages.ingest.app import resolve_api_key

    monkeypatch.setenv("STAGEWISE_API_KEY", env)
    path = ""
    if file_text is not None:
        (tmp_path / "key").write_text(file_text)
        path = str(tmp_path / "key")
    assert resolve_api_key(ServerArgs(api_key=flag, api_key_file=path)) == expected


def test_empty_or_missing_key_file_is_a_config_error(tmp_path, monkeypatch):
    from pipeline.config import ConfigError
    from stages.ingest.app import resolve_api_key

    monkeypatch.delenv("STAGEWISE_API_KEY", raising=False)
    (tmp_path / "empty").write_text("\n")
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ConfigError, match="--api-key-file"):
            resolve_api_key(ServerArgs(api_key_file=str(path)))


def test_api_key_from_the_environment_guards_the_routes(monkeypatch):
    monkeypatch.setenv("STAGEWISE_API_KEY", "env-secret")

    async def test(client, ctx):
        assert (await client.get("/v1/models")).status == 401
        assert (await client.get("/v1/models", headers={"x-api-key": "env-secret"})).status == 200
        assert (await client.get("/health")).status == 200

    run("echo", test)
