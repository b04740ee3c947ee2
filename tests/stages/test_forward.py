"""ForwardStage alone: ForwardBatch in, logits out, equal to Hugging Face on the same weights.

Covers a two-request prefill, a decode step reading the cached K/V, and a
prefix hit whose first tokens come in through RowWrites (slots another
request computed) -- on the reference backend and on the Triton kernels
(interpreted on CPU).
"""
from __future__ import annotations

import msgspec
import pytest
import torch

from pipeline.config import ServerArgs, resolve
from pipeline.harness import StageDriver, wiring
from pipeline.messages import ForwardBatch, ForwardInbox, RowWrite, SamplingBatch
from stages.forward import ForwardStage
from tests.engine.conftest import tiny_llama  # noqa: F401  (session fixture)


def _sampling(n: int) -> SamplingBatch:
    return SamplingBatch(temperatures=[0.0] * n, top_ps=[1.0] * n, top_ks=[-1] * n, min_ps=[0.0] * n,
                         repetition_penalties=[1.0] * n, frequency_penalties=[0.0] * n,
                         presence_penalties=[0.0] * n, seeds=[0] * n, steps=[0] * n, need_sample=[True] * n,
                         first_step=[True] * n, return_logprob=[False] * n, top_logprobs_nums=[0] * n,
                         constrained=[False] * n)


def _batch(batch_id: int, mode: str, rows: list[tuple[int, list[int], int, list[int]]],
           row_writes: list[RowWrite] = ()) -> ForwardBatch:
    """rows: (req row, new token ids, prefix_len, their slots)."""
    ids, positions, slots = [], [], []
    for _, tokens, prefix, new_slots in rows:
        ids += tokens
        positions += list(range(prefix, prefix + len(tokens)))
        slots += new_slots
    return ForwardBatch(batch_id=batch_id, mode=mode, rids=[f"r{r[0]}" for r in rows], input_ids=ids,
                        positions=positions, out_cache_loc=slots, req_pool_indices=[r[0] for r in rows],
                        prefix_lens=[r[2] for r in rows], extend_lens=[len(r[1]) for r in rows],
                        seq_lens=[r[2] + len(r[1]) for r in rows], row_writes=list(row_writes),
                        sampling=_sampling(len(rows)))


def _hf_last_logits(path, sequences: list[list[int]]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.stack([model(torch.tensor([s])).logits[0, -1] for s in sequences])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_forward_matches_transformers_through_prefill_decode_and_prefix_hit(tiny_llama, backend, device) -> None:
    args = resolve(msgspec.structs.replace(ServerArgs(), model_path=str(tiny_llama), device=device.type,
                                           kernel_backend=backend, max_total_tokens=256, dtype="float32",
                                           disable_cuda_graph=True))
    driver = StageDriver(ForwardStage(args, *wiring(ForwardInbox, "sample")))
    tol = dict(atol=2e-4, rtol=1e-4) if device.type == "cpu" else dict(atol=5e-3, rtol=5e-3)  # tf32 GEMMs
    # 256 KV tokens: at most 128 running requests (half the KV tokens) -> 128 rows + row 0
    assert driver.stage.model_info.num_slots == 257 and driver.stage.model_info.num_rows == 129
    a, b = [0, 5, 9, 33, 7, 120, 41], [0, 17, 250, 3]
    slots_a, slots_b = list(range(1, 8)), list(range(20, 24))
    driver.feed(_batch(0, "extend", [(1, a, 0, slots_a), (2, b, 0, slots_b)]))
    logits = driver.step()["sample"][0].logits.cpu()
    torch.testing.assert_close(logits, _hf_last_logits(tiny_llama, [a, b]), **tol)

    driver.feed(_batch(1, "decode", [(1, [11], 7, [8]), (2, [12], 4, [24])]))
    logits = driver.step()["sample"][0].logits.cpu()
    torch.testing.assert_close(logits, _hf_last_logits(tiny_llama, [a + [11], b + [12]]), **tol)

    c = a[:5] + [77, 78]  # shares a's first 5 tokens: their K/V are reused through row writes
    driver.feed(_batch(2, "extend", [(3, c[5:], 5, [30, 31])], [RowWrite(row=3, start=0, slots=slots_a[:5])]))
    message = driver.step()["sample"][0]
    assert message.rids == ["r3"] and message.batch_id == 2
    torch.testing.assert_close(message.logits.cpu(), _hf_last_logits(tiny_llama, [c]), **tol)
    assert driver.stage.runner.req_to_token[3, :7].tolist() == slots_a[:5] + [30, 31]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (decode graphs)")
def test_captured_decode_equals_eager(tiny_llama) -> None:
    """A decode batch replayed through a captured graph (req_to_token written by the IndexOps table
    inside it) gives the eager step's logits. Triton backend only: the PyTorch references read
    lengths on the host, which a graph capture cannot do."""
    backend = "triton"
    def stage(disable_cuda_graph: bool) -> StageDriver:
        args = resolve(msgspec.structs.replace(ServerArgs(), model_path=str(tiny_llama), device="cuda",
                                               kernel_backend=backend, max_total_tokens=256, dtype="float32",
                                               disable_cuda_graph=disable_cuda_graph, cuda_graph_max_bs=4))
        return StageDriver(ForwardStage(args, *wiring(ForwardInbox, "sample")))

    graphs, eager = stage(False), stage(True)
    assert graphs.stage.runner.graphs is not None and eager.stage.runner.graphs is None
    a, b = [0, 5, 9, 33, 7], [0, 17, 250]
    outputs = []
    for driver in (graphs, eager):
        driver.feed(_batch(0, "extend", [(1, a, 0, list(range(1, 6))), (2, b, 0, [20, 21, 22])]))
        driver.step()
        driver.feed(_batch(1, "decode", [(1, [11], 5, [6]), (2, [12], 3, [23])]))
        outputs.append(driver.step()["sample"][0].logits.cpu())
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)
    assert graphs.stage.runner.req_to_token[1, :6].tolist() == [1, 2, 3, 4, 5, 6]
