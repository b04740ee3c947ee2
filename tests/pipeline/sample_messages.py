"""One realistic instance of every message type in pipeline.messages (tensors included)."""
from __future__ import annotations

import torch

from pipeline import messages as m


def sampling_batch(num_reqs: int) -> m.SamplingBatch:
    return m.SamplingBatch(
        temperatures=[0.7] * num_reqs, top_ps=[0.9] * num_reqs, top_ks=[40] * num_reqs,
        min_ps=[0.0] * num_reqs, repetition_penalties=[1.1] * num_reqs,
        frequency_penalties=[0.0] * num_reqs, presence_penalties=[0.5] * num_reqs,
        seeds=[1234 + i for i in range(num_reqs)], steps=[3] * num_reqs, need_sample=[True] * num_reqs,
        first_step=[False] * num_reqs, return_logprob=[i == 0 for i in range(num_reqs)],
        top_logprobs_nums=[2 if i == 0 else 0 for i in range(num_reqs)], constrained=[False, True][:num_reqs])


def every_message() -> list[m.Message]:
    """Instances of every type in ALL_MESSAGE_TYPES, in that order."""
    params = m.SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=40, stop=["\n\n"],
                              stop_token_ids=[2], seed=7, return_logprob=True, top_logprobs_num=2,
                              json_schema='{"type": "object"}')
    generator = torch.Generator().manual_seed(0)
    built: list[m.Message] = [
        m.GenerateRequest(rid="req-1", messages=[
            m.ChatMessage(role="system", content="Be brief."),
            m.ChatMessage(role="assistant", tool_calls=[m.ToolCall(id="call-1", function=m.FunctionCall(
                name="get_weather", arguments='{"city": "Paris"}'))]),
            m.ChatMessage(role="tool", content="sunny", tool_call_id="call-1")],
            sampling=params, stream=True, tools=[{"type": "function", "function": {"name": "get_weather"}}],
            chat_template_kwargs={"enable_thinking": False}, arrival_time_s=1700000000.25),
        m.TokenizedRequest(rid="req-1.0", parent_rid="req-1", index=0, input_ids=[1, 15043, 29892, 3186],
                           sampling=params, stream=True,
                           images=[m.ImageInput(dtype="uint8", shape=[2, 2, 3], data=bytes(range(12)))],
                           arrival_time_s=1700000000.5),
        m.Abort(rid="req-2", reason="client disconnected"),
        m.FlushCache(request_id="flush-1"),
        m.ForwardBatch(batch_id=41, mode="extend", rids=["req-1.0", "req-3"], input_ids=[1, 15043, 29892, 7],
                       positions=[0, 1, 2, 9], out_cache_loc=[100, 101, 102, 57], req_pool_indices=[0, 1],
                       prefix_lens=[0, 9], extend_lens=[3, 1], seq_lens=[3, 10],
                       row_writes=[m.RowWrite(row=1, start=0, slots=[10, 11, 12])], sampling=sampling_batch(2)),
        m.Logits(batch_id=41, rids=["req-1.0", "req-3"], logits=torch.randn(2, 50, generator=generator),
                 sampling=sampling_batch(2)),
        m.GrammarCompile(rid="req-1.0", kind="json_schema", spec='{"type": "object"}'),
        m.GrammarReady(rid="req-1.0", error=None),
        m.GrammarRelease(rid="req-1.0"),
        m.TokenMask(batch_id=41, row_indices=[1],
                    bitmask=torch.tensor([[0x7FFFFFFF, -1]], dtype=torch.int32)),
        m.SampledTokens(batch_id=41, rids=["req-1.0", "req-3"], token_ids=[-1, 42],
                        token_logprobs=[0.0, -0.25], top_token_ids=[[], [42, 7]], top_logprobs=[[], [-0.25, -1.5]]),
        m.TokenOutputBatch(outputs=[m.TokenOutput(
            rid="req-3", parent_rid="req-3", new_token_ids=[42],
            finish_reason=m.FinishReason(type="stop", matched=2), prompt_tokens=9, completion_tokens=4,
            cached_tokens=8, token_logprobs=[-0.25], top_token_ids=[[42, 7]], top_logprobs=[[-0.25, -1.5]])]),
        m.TextOutput(rid="req-3", parent_rid="req-3", text_delta=" ok\u00e9", token_ids_delta=[42],
                     finish_reason=m.FinishReason(type="length"), prompt_tokens=9, completion_tokens=4),
        m.ErrorOutput(rid="req-4", status_code=400, message="prompt too long", param="messages"),
        m.EngineStats(time_s=12.5, num_running_reqs=3, num_queue_reqs=1, token_usage=0.25, cache_hit_rate=0.5,
                      gen_throughput=123.4, max_total_num_tokens=4096),
        m.ProcessCounters(process="engine", time_s=12.5, stages={"schedule": {"messages_in": 10.0, "busy_s": 0.5}}),
        m.KVHandoff(rid="req-5.1", parent_rid="req-5", index=1, input_ids=[1, 2, 3], sampling=params,
                    max_new_tokens=16, seed=7, prefill_engine=0,
                    first=m.TokenOutput(rid="req-5.1", parent_rid="req-5", index=1, new_token_ids=[42],
                                        prompt_tokens=3, completion_tokens=1, token_logprobs=[-0.5])),
        m.KVFirst(rid="req-6", first=m.TokenOutput(rid="req-6", parent_rid="req-6", new_token_ids=[9],
                                                   finish_reason=m.FinishReason(type="length"), prompt_tokens=40,
                                                   completion_tokens=1)),
        m.KVAccept(rid="req-5.1", transfer_id=3, decode_rank=1, skip=2),
        m.KVSend(rid="req-5.1", transfer_id=3, peer=1, slots=[17], segment=2),
        m.KVRecv(rid="req-5.1", transfer_id=3, peer=0, slots=[5], segment_tokens=16),
        m.KVTransferDone(rid="req-5.1", transfer_id=3, direction="recv", ok=True, num_bytes=256, seconds=0.01,
                         transport="shm"),
        m.EngineDown(role="decode", index=1, rank=2, reason="process 'engine_decode1' exited"),
        m.HandedOff(rid="req-5.1", parent_rid="req-5", decode=1),
    ]
    assert [type(x) for x in built] == list(m.ALL_MESSAGE_TYPES)
    return built
