"""The forward pass computes only through KernelOps.

Every op of the table is wrapped so that a torch dispatch mode can tell
whether an aten call happens inside a kernel op (allowed: that is the
backend) or in the model code itself. Outside the ops, the model may only
take views and slices: even the logits rows are gathered by a kernel op and
leave the lm_head in fp32.
"""
from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import models
from models.batch import build_metadata_reference
from tests.models.runner import PagedRunner
from triton_kernels import KernelOps, load_ops

ALLOWED = {"aten.view.default", "aten.slice.Tensor", "aten.select.int", "aten.detach.default"}


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.outside: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.depth == 0:
            self.outside[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _wrapped_ops(recorder: _Recorder) -> KernelOps:
    ops = load_ops("reference")

    def wrap(fn):
        def inside(*args, **kwargs):
            recorder.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                recorder.depth -= 1
        return inside

    names = [f.name for f in dataclasses.fields(ops) if f.name != "backend"]
    return dataclasses.replace(ops, **{name: wrap(getattr(ops, name)) for name in names})


@pytest.mark.parametrize("name", ["qwen3", "qwen2_moe"])
def test_forward_calls_only_kernel_ops(name, tiny_checkpoint):
    recorder = _Recorder()
    model, config = models.load_model(tiny_checkpoint(name), _wrapped_ops(recorder),
                                      torch.float32, "cpu")
    runner = PagedRunner(model, 2, 8)
    slots = runner.req_to_token[0, :4].tolist() + runner.req_to_token[1, :2].tolist()
    meta = build_metadata_reference("extend", runner.req_to_token, [0, 1], [0, 0], [4, 2], slots, "cpu")
    ids = torch.tensor([5, 6, 7, 8, 9, 10])
    positions = torch.tensor([0, 1, 2, 3, 0, 1])
    decode = build_metadata_reference("decode", runner.req_to_token, [0, 1], [4, 2], [1, 1],
                                      [int(runner.req_to_token[0, 4]), int(runner.req_to_token[1, 2])], "cpu")
    next_ids, next_positions = torch.tensor([11, 12]), torch.tensor([4, 2])
    with recorder:
        logits = model.forward(ids, positions, meta, runner.kv_cache)
        next_logits = model.forward(next_ids, next_positions, decode, runner.kv_cache)
    assert logits.shape == next_logits.shape == (2, config.vocab_size)
    assert "aten.view.default" in recorder.outside      # the recorder sees model code
    extra = set(recorder.outside) - ALLOWED
    assert not extra, f"model code computes outside KernelOps: {sorted(extra)}"
