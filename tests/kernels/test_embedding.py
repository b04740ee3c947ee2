"""embedding (vocab-sharded lookup) vs reference and a float64 gather."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.util import DTYPES, ON_GPU, assert_close
from triton_kernels import embedding

CASES = [(1, 50, 64, 0), (9, 37, 100, 0), (13, 40, 72, 30)] + ([(4096, 32000, 1024, 0), (7, 5000, 4096, 5000)] if ON_GPU else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_embedding(device, dtype, case, id_dtype):
    tokens, vocab_shard, hidden, vocab_start = case
    gen = torch.Generator().manual_seed(tokens + hidden)
    weight = torch.randn(vocab_shard, hidden, generator=gen).to(dtype=dtype, device=device)
    # Ids from below, inside and above this shard (the full vocabulary is 3 shards).
    ids = torch.randint(0, vocab_start + 2 * vocab_shard, (tokens,), generator=gen)
    ids[0] = vocab_start  # at least one id inside the shard
    ids = ids.to(dtype=id_dtype, device=device)
    y = embedding.embedding(ids, weight, vocab_start)
    rows = ids.long().cpu() - vocab_start
    inside = (rows >= 0) & (rows < vocab_shard)
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    expected[inside] = weight[rows[inside].to(device)].double().cpu()
    assert_close(y, expected, dtype, "embedding vs float64")
    assert torch.equal(y, embedding.embedding_reference(ids, weight, vocab_start)), "vs reference"
    assert torch.count_nonzero(y[~inside.to(device)]) == 0, "out-of-shard rows must be zero"


def test_bad_inputs(device):
    w = torch.randn(10, 8, device=device)
    with pytest.raises(ValueError, match="ids dtype"):
        embedding.embedding(torch.zeros(3, device=device), w)
    with pytest.raises(ValueError, match="empty batch"):
        embedding.embedding(torch.zeros(0, dtype=torch.int64, device=device), w)
    with pytest.raises(ValueError, match="1-D"):
        embedding.embedding(torch.zeros(2, 2, dtype=torch.int64, device=device), w)
    with pytest.raises(ValueError, match="vocab_start"):
        embedding.embedding(torch.zeros(2, dtype=torch.int64, device=device), w, -1)
