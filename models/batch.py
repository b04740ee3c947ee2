"""What a model's ``forward`` receives besides token ids and positions.

The forward stage turns a ``ForwardBatch`` message (plain Python ints) into
these device tensors once per step; the model layers only read them. Nothing
here knows about requests: a row of ``req_to_token`` is just a row.

``AttentionMetadata`` fields (B requests in the batch, T new tokens in all):

==================  ===========  ============================================
field               shape/dtype  meaning
==================  ===========  ============================================
mode                str          "extend" (any prefill chunk) or "decode"
req_to_token        [R, L] i32   slot of token i of the request in row r
req_pool_indices    [B] i32      row of each request
prefix_lens         [B] i32      tokens already in the KV pool before this step
extend_lens         [B] i32      new tokens this step (1 for decode)
extend_start_loc    [B] i32      first q row of each request (exclusive cumsum)
seq_lens            [B] i32      prefix_lens + extend_lens
out_cache_loc       [T] i64      slot where each new token's K/V is stored
logits_indices      [B] i64      q row of each request's last new token
max_extend_len      int          max(extend_lens), host int (grid size)
max_seq_len         int          max(seq_lens), host int
tree_mask           [M] bool     speculative verify (None otherwise): each request's
                                 [n, n] draft-tree mask, flattened one after another
mask_start_loc      [B] i64      where request b's mask starts in tree_mask
==================  ===========  ============================================

With ``tree_mask`` an extend batch runs tree attention
(``triton_kernels/tree_attention.py``): request b's new tokens are the nodes
of a draft tree, ``extend_lens`` its node counts, and a node sees the
prefix plus the nodes its mask row marks (a row without a tree carries the
causal lower triangle).

``KVCache`` holds, per layer, one ``[num_slots, num_kv_heads, head_dim]`` tensor
for K and one for V, in the model's dtype or, with ``--kv-cache-dtype
fp8_e4m3``, in ``float8_e4m3fn`` (one byte a value, so twice the tokens fit;
the kernels quantise on store and dequantise on read with each layer's
``k_scale`` / ``v_scale``, see triton_kernels/kv_fp8.py). The tensors belong
to the forward stage; which slots are
free belongs to the schedule stage.
"""
from __future__ import annotations

import dataclasses

import torch

# --kv-cache-dtype names that are not model dtypes (the others resolve like --dtype).
KV_ONLY_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn}


@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Batch layout for attention and KV stores (process-local, built by forward)."""

    mode: str
    req_to_token: torch.Tensor
    req_pool_indices: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    extend_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    out_cache_loc: torch.Tensor
    logits_indices: torch.Tensor
    max_extend_len: int
    max_seq_len: int
    tree_mask: torch.Tensor | None = None
    mask_start_loc: torch.Tensor | None = None

    @property
    def num_reqs(self) -> int:
        return int(self.req_pool_indices.shape[0])


@dataclasses.dataclass(frozen=True)
class KVCache:
    """The paged KV pool: per layer K and V, each ``[num_slots, num_kv_heads, head_dim]``."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        shape = (num_slots, num_kv_heads, head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return cls(k=k, v=v)

    @property
    def num_slots(self) -> int:
        return int(self.k[0].shape[0])

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * element_size


def build_metadata_reference(
    mode: str,
    req_to_token: torch.Tensor,
    req_pool_indices: list[int],
    prefix_lens: list[int],
    extend_lens: list[int],
    out_cache_loc: list[int],
    device: torch.device | str,
) -> AttentionMetadata:
    """Build AttentionMetadata from host lists with plain torch (tests, CPU backend)."""
    extend_start = [0]
    for length in extend_lens[:-1]:
        extend_start.append(extend_start[-1] + length)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    last_rows = [s + e - 1 for s, e in zip(extend_start, extend_lens)]

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return AttentionMetadata(
        mode=mode,
        req_to_token=req_to_token,
        req_pool_indices=i32(req_pool_indices),
        prefix_lens=i32(prefix_lens),
        extend_lens=i32(extend_lens),
        extend_start_loc=i32(extend_start),
        seq_lens=i32(seq_lens),
        out_cache_loc=torch.tensor(out_cache_loc, dtype=torch.int64, device=device),
        logits_indices=torch.tensor(last_rows, dtype=torch.int64, device=device),
        max_extend_len=max(extend_lens) if extend_lens else 0,
        max_seq_len=max(seq_lens) if seq_lens else 0,
    )
