"""Speculative decoding building blocks: drafters, draft-tree layout, verification.

* ``tree.py``: a draft tree (root = the last emitted token, then drafts in
  topological order), its verify layout (mask, positions, retrieve indices)
  and top-k pruning by cumulative draft score;
* ``ngram.py``: the n-gram drafter (prompt + generated tokens, no model);
* ``verify.py``: greedy acceptance and tree rejection sampling that keeps the
  target distribution (after temperature, top-k, top-p, min-p).

The EAGLE / EAGLE3 draft heads are models (``models/eagle.py``); tree
attention is a kernel (``triton_kernels/tree_attention.py``). Nothing here
imports another stage: the schedule, forward and sample stages call these.
"""
