"""Draft-tree building on the device: prune EAGLE candidates and lay the tree out for verification.

After ``--speculative-num-steps`` of top-k expansion, drafting row ``s`` holds
``C`` candidates in creation order (the first ``k`` at depth 1, then ``k*k``
per further depth): their target token ids ``tokens[s, c]``, their parents
as node ids ``parents[s, c]`` (0 the root, candidate ``c'`` is node
``c' + 1``, a parent always created earlier) and their cumulative draft
log-probabilities ``scores[s, c]`` (a child's is its parent's plus a
log-probability <= 0, so it never exceeds its parent's). This op keeps the
``num_drafts[s]`` best candidates and writes the tree where the verify
forward reads it, so no device -> host copy stands between drafting and the
verify forward::

    rank(c) = #{c' : score(c') > score(c)  or  (score(c') == score(c) and c' < c)}
    kept    = {c : rank(c) < num_drafts}          (closed under parents: see above)
    new(c)  = 1 + #{kept c' < c}                  (node ids of the pruned tree, root 0)

This is ``stages/speculative/tree.prune_tree``'s order (best first; ties:
shallower, then earlier -- creation order is by depth) and numbering (kept
ids ascending, so parents precede children). Outputs, per row (``r0 =
row_start[s]``, the root's row in the batch, ``n = num_drafts[s] + 1``):

* ``input_ids[r0 + new(c)] = tokens[s, c]`` and
  ``positions[r0 + new(c)] = positions[r0] + depth(c)`` (the rotary position);
* the ``[n, n]`` ancestor mask at ``tree_mask[mask_start[s] + i * mask_stride[s] + j]``
  (1 iff node j is node i or an ancestor; every entry of the block written);
* ``draft_tokens[s, :]`` (the drafts in node order, -1 past ``num_drafts``) and
  ``draft_parents[s, :]`` (-1 for the root, then each node's parent; -1 past),
  which the host reads after the verify forward is launched.

Kernel: one program per row, ``BLOCK_C >= C + 1`` candidates in registers; the
ranks, new ids and parents' new ids are pairwise counts over ``[BLOCK_C,
BLOCK_C]``, the ancestors ``MAX_DEPTH`` pointer-chasing steps (each a
pairwise one-hot gather). ``O(S * C^2 * depth)`` integer work and a few KB
of stores: launch-bound, one launch instead of the dozen small torch ops of
the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _draft_tree_kernel(
    tokens_ptr, parents_ptr, scores_ptr, num_drafts_ptr, ids_ptr, pos_ptr, row_start_ptr,
    mask_ptr, mask_start_ptr, mask_stride_ptr, out_tokens_ptr, out_parents_ptr,
    num_cands, max_drafts,
    MAX_DEPTH: tl.constexpr, BLOCK_C: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    valid = offs < num_cands
    score = tl.load(scores_ptr + s * num_cands + offs, mask=valid, other=float("-inf")).to(tl.float32)
    parent = tl.load(parents_ptr + s * num_cands + offs, mask=valid, other=0).to(tl.int64)
    token = tl.load(tokens_ptr + s * num_cands + offs, mask=valid, other=0)
    num_drafts = tl.load(num_drafts_ptr + s).to(tl.int32)

    # ---- which candidates stay, and their node ids in the pruned tree
    earlier = offs[None, :] < offs[:, None]                              # [c, c'] : c' < c
    better = (score[None, :] > score[:, None]) | ((score[None, :] == score[:, None]) & earlier)
    rank = tl.sum((valid[None, :] & better).to(tl.int32), axis=1)
    keep = valid & (rank < num_drafts)
    new_id = 1 + tl.sum((keep[None, :] & earlier).to(tl.int32), axis=1)
    below_parent = keep[None, :] & (offs[None, :] < (parent - 1)[:, None])
    new_parent = tl.where(parent == 0, 0, 1 + tl.sum(below_parent.to(tl.int32), axis=1))

    # ---- ancestors (candidate space) and depths, by following parent pointers
    ancestor = offs[:, None] == offs[None, :]
    depth = tl.full([BLOCK_C], 1, dtype=tl.int64)
    cur = parent
    for _ in tl.static_range(MAX_DEPTH):
        hit = cur[:, None] == (offs[None, :] + 1)                        # one-hot of cur's candidate
        ancestor = ancestor | hit
        depth += (cur > 0).to(tl.int64)
        cur = tl.sum(tl.where(hit, parent[None, :], 0), axis=1)

    # ---- the verify forward's inputs and mask
    r0 = tl.load(row_start_ptr + s).to(tl.int64)
    root_pos = tl.load(pos_ptr + r0)
    tl.store(ids_ptr + r0 + new_id, token, mask=keep)
    tl.store(pos_ptr + r0 + new_id, root_pos + depth, mask=keep)
    m0 = tl.load(mask_start_ptr + s).to(tl.int64)
    stride = tl.load(mask_stride_ptr + s).to(tl.int64)
    node = new_id.to(tl.int64)
    ones = tl.full([BLOCK_C], 1, dtype=tl.uint8)
    tl.store(mask_ptr + m0 + node[:, None] * stride + node[None, :], ancestor.to(tl.uint8),
             mask=keep[:, None] & keep[None, :])
    tl.store(mask_ptr + m0 + node * stride, ones, mask=keep)             # column 0: the root
    tl.store(mask_ptr + m0 + node, ones * 0, mask=keep)                  # row 0: the root alone
    tl.store(mask_ptr + m0 + offs, ones, mask=offs == 0)

    # ---- compact copies for the host (read after the verify forward is launched)
    tl.store(out_tokens_ptr + s * max_drafts + node - 1, token, mask=keep)
    tl.store(out_tokens_ptr + s * max_drafts + offs, token * 0 - 1,
             mask=(offs >= num_drafts) & (offs < max_drafts))
    tl.store(out_parents_ptr + s * (max_drafts + 1) + node, new_parent, mask=keep)
    tl.store(out_parents_ptr + s * (max_drafts + 1) + offs, new_parent * 0 - 1,
             mask=((offs == 0) | (offs > num_drafts)) & (offs <= max_drafts))


def _check(tokens, parents, scores, num_drafts, input_ids, positions, row_start, tree_mask, mask_start,
           mask_stride, max_drafts: int, max_depth: int) -> None:
    if tokens.dim() != 2 or parents.shape != tokens.shape or scores.shape != tokens.shape:
        raise ValueError(f"tokens, parents, scores must be [S, C] alike, got {tuple(tokens.shape)}, "
                         f"{tuple(parents.shape)}, {tuple(scores.shape)}")
    num_rows, num_cands = tokens.shape
    for name, t in (("num_drafts", num_drafts), ("row_start", row_start), ("mask_start", mask_start),
                    ("mask_stride", mask_stride)):
        if t.dim() != 1 or t.shape[0] != num_rows:
            raise ValueError(f"{name} must be [S={num_rows}], got {tuple(t.shape)}")
    for name, t in (("input_ids", input_ids), ("positions", positions)):
        if t.dim() != 1 or t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D int64 tensor, got {t.dtype} {tuple(t.shape)}")
    if tree_mask.dim() != 1 or tree_mask.dtype not in (torch.bool, torch.uint8) or not tree_mask.is_contiguous():
        raise ValueError(f"tree_mask must be a contiguous 1-D bool/uint8 tensor, got {tree_mask.dtype}")
    if not 1 <= max_drafts <= num_cands:
        raise ValueError(f"max_drafts must be in 1..C={num_cands}, got {max_drafts}")
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")


def _outputs(num_rows: int, max_drafts: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(num_rows, max_drafts, dtype=torch.int64, device=device),
            torch.empty(num_rows, max_drafts + 1, dtype=torch.int64, device=device))


def build_draft_tree(tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor, num_drafts: torch.Tensor,
                     input_ids: torch.Tensor, positions: torch.Tensor, row_start: torch.Tensor,
                     tree_mask: torch.Tensor, mask_start: torch.Tensor, mask_stride: torch.Tensor,
                     max_drafts: int, max_depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune each row's candidates to ``num_drafts[s]`` (each <= ``max_drafts``) and write its tree
    into ``input_ids``, ``positions`` and ``tree_mask`` in place (module docstring) ->
    (draft_tokens [S, max_drafts], draft_parents [S, max_drafts + 1]). ``max_depth``: the deepest
    candidate's depth (the drafting steps)."""
    _check(tokens, parents, scores, num_drafts, input_ids, positions, row_start, tree_mask, mask_start,
           mask_stride, max_drafts, max_depth)
    num_rows, num_cands = tokens.shape
    out_tokens, out_parents = _outputs(num_rows, max_drafts, tokens.device)
    if num_rows == 0:
        return out_tokens, out_parents
    mask = tree_mask.view(torch.uint8) if tree_mask.dtype == torch.bool else tree_mask
    block_c = triton.next_power_of_2(num_cands + 1)
    # [block_c, block_c] tiles of int64: at 64 candidates 4 warps spilled 392 B (sm90 SASS), 8 do not
    num_warps = 4 if block_c < 64 else min(16, block_c // 8)
    _draft_tree_kernel[(num_rows,)](
        tokens.contiguous(), parents.contiguous(), scores.contiguous(), num_drafts, input_ids, positions,
        row_start, mask, mask_start, mask_stride, out_tokens, out_parents, num_cands, max_drafts,
        MAX_DEPTH=max_depth, BLOCK_C=block_c, num_warps=num_warps)
    return out_tokens, out_parents


def reference(tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor, num_drafts: torch.Tensor,
              input_ids: torch.Tensor, positions: torch.Tensor, row_start: torch.Tensor,
              tree_mask: torch.Tensor, mask_start: torch.Tensor, mask_stride: torch.Tensor,
              max_drafts: int, max_depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and result in plain PyTorch (batched tensor ops, no host copy)."""
    _check(tokens, parents, scores, num_drafts, input_ids, positions, row_start, tree_mask, mask_start,
           mask_stride, max_drafts, max_depth)
    num_rows, num_cands = tokens.shape
    device, n = tokens.device, max_drafts + 1
    cand = torch.arange(num_cands, device=device)
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices    # ties: earlier first
    rank = torch.empty_like(order).scatter_(1, order, cand.expand(num_rows, num_cands).contiguous())
    keep = rank < num_drafts[:, None]
    new_id = torch.cumsum(keep.long(), 1)                                   # node id of each kept candidate
    node_new = torch.cat([torch.zeros_like(new_id[:, :1]), new_id], 1)      # node id -> new id (root 0)
    new_parent = node_new.gather(1, parents.long())
    ancestor = torch.eye(num_cands, dtype=torch.bool, device=device).expand(num_rows, -1, -1).clone()
    depth, cur = torch.ones_like(new_id), parents.long()
    node_parent = torch.cat([torch.zeros_like(cur[:, :1]), cur], 1)
    for _ in range(max_depth):
        has = cur > 0
        ancestor |= torch.nn.functional.one_hot((cur - 1).clamp(min=0), num_cands).bool() & has[..., None]
        depth += has.long()
        cur = node_parent.gather(1, cur)
    dump = torch.where(keep, new_id, n)                                     # index n: discarded
    rows = torch.arange(num_rows, device=device)[:, None]
    out_tokens = torch.full((num_rows, n + 1), -1, dtype=torch.int64, device=device)
    out_tokens[rows, dump] = tokens.long()
    out_parents = torch.full((num_rows, n + 1), -1, dtype=torch.int64, device=device)
    out_parents[rows, dump] = new_parent
    node_depth = torch.zeros(num_rows, n + 1, dtype=torch.int64, device=device)
    node_depth[rows, dump] = depth
    block = torch.zeros(num_rows, n + 1, n + 1, dtype=torch.bool, device=device)
    block[rows[:, :, None], dump[:, :, None], dump[:, None, :]] = ancestor & keep[:, None, :]
    block[:, :, 0] = True
    block[:, 0, 1:] = False
    _write_rows(input_ids, positions, row_start, num_drafts, out_tokens[:, 1:n], node_depth[:, :n])
    _write_masks(tree_mask, mask_start, mask_stride, num_drafts + 1, block[:, :n, :n])
    return out_tokens[:, 1:n].contiguous(), out_parents[:, :n].contiguous()


def _write_rows(input_ids: torch.Tensor, positions: torch.Tensor, row_start: torch.Tensor,
                num_drafts: torch.Tensor, drafts: torch.Tensor, depth: torch.Tensor) -> None:
    """input_ids[r0 + 1 + j] = drafts[:, j] and positions[r0 + i] = positions[r0] + depth[:, i]
    where j < num_drafts (i <= num_drafts); entries past a row's tree rewrite its root."""
    n = depth.shape[1]
    node = torch.arange(n, device=depth.device)
    inside = node[None, :] <= num_drafts[:, None]
    index = torch.where(inside, row_start[:, None] + node, row_start[:, None])
    root_ids, root_pos = input_ids[row_start], positions[row_start]
    ids = torch.cat([root_ids[:, None], drafts], 1)
    input_ids[index] = torch.where(inside, ids, root_ids[:, None])
    positions[index] = root_pos[:, None] + torch.where(inside, depth, 0)


def _write_masks(tree_mask: torch.Tensor, mask_start: torch.Tensor, mask_stride: torch.Tensor,
                 sizes: torch.Tensor, block: torch.Tensor) -> None:
    """Each row's top-left ``sizes[s]`` square of ``block`` into its place; entries outside the
    square rewrite the root's own entry (always 1)."""
    n = block.shape[1]
    i = torch.arange(n, device=block.device)
    inside = (i[None, :, None] < sizes[:, None, None]) & (i[None, None, :] < sizes[:, None, None])
    flat = mask_start[:, None, None] + i[None, :, None] * mask_stride[:, None, None] + i[None, None, :]
    index = torch.where(inside, flat, mask_start[:, None, None])
    values = torch.where(inside, block, True)
    target = tree_mask.view(torch.uint8) if tree_mask.dtype == torch.bool else tree_mask
    target[index.flatten()] = values.flatten().to(target.dtype)


build_draft_tree_reference = reference
