"""EAGLE / EAGLE3 drafting inside the forward stage: a chain or a tree of drafts per verifying row.

The schedule stage plans a drafting row exactly as for NGRAM (the last token
then ``d`` drafts, KV slots at the drafts' positions) but with placeholder
draft ids; this module replaces them by the draft head's chain on the
device, after ``req_to_token`` is written and before the target runs, and
hands the real ids back (``draft``) so the sample stage verifies them.

Notation: ``x_i`` the token at position ``i``, ``f_i`` the target's feature
at ``i`` (EAGLE: the last layer's normed output; EAGLE3: the residual stream
entering layers ``low, mid, high``, concatenated). The head at position ``i``
reads ``(x_{i+1}, f_i)`` and predicts ``x_{i+2}`` (SGLang's shifted inputs).

The head's own KV (one layer) lives in a pool with the target's slot
numbering: the head's K/V of position ``i`` of a request sits in the same
slot as the target's, found through the same ``req_to_token`` row. So the
head needs no allocator of its own, a radix-cache prefix brings the head's
K/V of that prefix along (as written by the request that computed it), and
the schedule stage's accounting (drafts' slots taken, rejected ones trimmed)
covers both pools.

Each step, per row (design: catch up exactly, then draft):

1. Catch-up. The previous step fed positions ``p0 .. p0+m-1`` of this row
   and kept their features (``_Pending``). This step's first position ``q``
   says how many were kept by verification: positions ``p0 .. q-1`` are now
   final, and their next tokens are the fed ones after them plus this
   step's first token. One extend forward of the head over those positions
   (every row at once) overwrites whatever the draft steps left there; its
   last row predicts ``x_{q+1}``, the first draft.
2. Drafting (rows with drafts). Draft step ``j`` runs the head at position
   ``q - 1 + j`` on the previous draft and the head's own hidden state
   (EAGLE3: the pre-norm residual), a decode step over the active rows; each
   step's argmax (EAGLE3: mapped through ``d2t``) is the next draft.
   Positions written lie inside the slots the schedule stage took.
3. After the target forward (``keep``), a row that fed no drafts (prefill
   chunk, plain decode) knows the next token of every position it fed but
   the last: the head runs over those right away, and only the last
   position's features wait for step 1. A verifying row keeps the features
   of every position it fed (at most ``drafts + 1``), as verification has
   yet to say which of them stand. So what waits is at most a few rows of
   features per request, copied out of the batch's tensors.

Trees (``--speculative-eagle-topk k > 1``, EAGLE-2's dynamic tree as in
SGLang). Step 2 becomes: the catch-up's last row gives the root's
next-token log-probs, whose top k are the depth-1 candidates (the first
frontier). Each further step (``--speculative-num-steps`` in all) runs the
head over every frontier node chosen so far -- a node reads its token and
its parent's head hidden at position ``q - 1 + depth`` and attends to the
head's KV prefix (positions ``< q``) and its own ancestors under a tree mask
(tree attention; the nodes' own K/V are recomputed each step, not stored,
so the head's pool holds only final positions) -- and every frontier node
proposes its top k children, scored by cumulative log-probability; the k
best of those k*k form the next frontier. All candidates are then pruned to
the row's draft count by score and laid out on the device in one launch
(``triton_kernels/draft_tree.py``: ``prune_tree``'s order, the nodes' ids,
rotary positions and ancestor mask written into the verify inputs).
The target verifies the tree in one forward: node ``i`` fed at the slot of
position ``q + i``, rotary position ``q + depth(i)``, tree attention with
the tree's mask (``tree_metadata``; rows without a tree attend causally and
store no mask).

No host syncs before the verify forward: ``draft`` returns a ``Drafted``
whose drafts and parents are still on the device (chains: one scatter into
the inputs; trees: the draft-tree launch), the runner launches the target
and only then copies them to the host (``Drafted.host``) for the sample
stage. What ``draft`` reads on the host (which rows catch up, their
positions, draft counts) comes from the batch, never from the device. The accepted path comes back in the next
batch (``ForwardBatch.spec_kept``): ``move_kept_kv`` copies its nodes' K/V to
the sequence positions, and step 1 takes the path's features.

Only the draft quality depends on the head's context; the output never
does (the sample stage verifies every draft against the target). A row
without usable features (a radix hit's last cached position, a retracted
and resumed request) keeps its placeholder drafts, which verification
rejects unless they happen to match. CUDA graphs serve EAGLE targets
too: decode batches replay the decode graphs and verify
batches the verify graphs (``stages/forward/graphs.py``), each graph keeping
the static feature tensors its capture produced; ``draft`` and ``keep``
take the padded rows' ``offsets``.

The head's own steps have graphs too (``graphs.DraftGraphs``, per decode
batch-size bucket; ``self.graphs`` once the runner turns graphs on): when a
batch fits a bucket, ``draft`` runs the catch-up padded to a fixed
``drafts + 1`` positions per row (``catch_up_padded``), then every row's
chain (``chain_steps``) or tree expansion (``grow_trees``) at the bucket's
size, each a replay; only the host-side layout (which rows, their draft
counts) and the tree layout launch stay outside. ``keep``'s catch-up of a
prefill chunk's positions stays eager: its length is the chunk's.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from models.batch import AttentionMetadata, KVCache
from models.config import read_json
from models.eagle import EagleHead, load_eagle_head
from pipeline.messages import ForwardBatch, KeptPath
from stages.speculative.tree import build_tree_layout, tree_steps
from triton_kernels import draft_tree


@dataclasses.dataclass
class _Pending:
    """Features of the positions a row fed last step, waiting for their next tokens."""

    rid: str
    start: int                 # first position fed
    features: torch.Tensor     # [m, F] on the device
    tokens: torch.Tensor       # [m] the ids fed (resolved, drafts filled in)


@dataclasses.dataclass(frozen=True)
class _Segment:
    """Row ``b`` of the batch (req_to_token ``row``): positions ``start .. start+count-1``
    are final; ``tokens`` are their next tokens, ``features`` their target features."""

    b: int
    row: int
    start: int
    count: int
    tokens: torch.Tensor
    features: torch.Tensor


def eagle3_layers(num_layers: int, layer_ids: list[int] | None = None) -> tuple[int, ...]:
    """Layers whose input EAGLE3 reads (SGLang: 2, L//2, L-3; or the config's
    ``eagle_aux_hidden_state_layer_ids`` + 1), clamped into the model's layers."""
    chosen = [i + 1 for i in layer_ids] if layer_ids else [2, num_layers // 2, num_layers - 3]
    return tuple(min(max(i, 0), num_layers - 1) for i in chosen)


def move_kept_kv(kv_cache: KVCache, req_to_token: torch.Tensor, kept: list[KeptPath]) -> None:
    """Copy each accepted tree node's K/V (written at ``start + node``) to its sequence position
    ``start + k`` (k = 1, 2, ...), every layer; reads every source before writing."""
    rows, src, dst = [], [], []
    for path in kept:
        for k, node in enumerate(path.nodes, start=1):
            if node != k:
                rows.append(path.row)
                src.append(path.start + node)
                dst.append(path.start + k)
    if not rows:
        return
    index = torch.tensor([rows, src, dst], dtype=torch.int64).to(req_to_token.device)
    src_slots = req_to_token[index[0], index[1]].long()
    dst_slots = req_to_token[index[0], index[2]].long()
    for cache in (*kv_cache.k, *kv_cache.v):
        cache[dst_slots] = cache[src_slots]


def tree_metadata(meta: AttentionMetadata, num_rows: int, drafted: "Drafted") -> AttentionMetadata:
    """``meta`` with the tree masks of a verify batch: a tree row reads its block of the
    drafter's mask; every other row (a chain, a prefill chunk) attends causally and stores no
    mask (``mask_start_loc`` -1, ``triton_kernels/tree_attention.py``)."""
    starts = [-1] * num_rows
    for b, start in zip(drafted.rows, drafted.mask_starts):
        starts[b] = start
    device = meta.req_to_token.device
    return dataclasses.replace(meta, tree_mask=drafted.tree_mask,
                               mask_start_loc=torch.tensor(starts, dtype=torch.int64).to(device))


def parents_metadata(meta: AttentionMetadata, parents: list[list[int]]) -> AttentionMetadata:
    """``meta`` with the masks of host-drafted trees (NGRAM: ``sampling.draft_parents`` per batch
    row); rows without a tree attend causally and store no mask."""
    masks, starts, at = [], [], 0
    for tree in parents:
        if tree:
            masks.append(build_tree_layout(tree).tree_mask.flatten())
            starts.append(at)
            at += len(tree) ** 2
        else:
            starts.append(-1)
    device = meta.req_to_token.device
    return dataclasses.replace(meta, tree_mask=torch.cat(masks).to(device),
                               mask_start_loc=torch.tensor(starts, dtype=torch.int64).to(device))


@dataclasses.dataclass
class Drafted:
    """One batch's drafts as ``EagleDrafter.draft`` left them: still on the device, so nothing
    waits for the head before the verify forward is launched. ``host`` copies them after."""

    drafts: list[list[int]]                     # per batch row, as planned (placeholders)
    rows: list[int] = dataclasses.field(default_factory=list)     # batch rows the head filled
    counts: list[int] = dataclasses.field(default_factory=list)   # their draft counts
    tokens: torch.Tensor | None = None          # chains: [sum(counts)]; trees: [len(rows), max count]
    parents: torch.Tensor | None = None         # trees: [len(rows), max count + 1], root -1 first
    tree_mask: torch.Tensor | None = None       # trees in the drafter's own mask (not a graph's)
    mask_starts: list[int] = dataclasses.field(default_factory=list)  # each tree row's block
    _host: tuple[list[list[int]], list[list[int]]] | None = None

    def host(self) -> tuple[list[list[int]], list[list[int]]]:
        """(drafts per row, tree parents per row -- [] for a chain, [] for all when no tree):
        one device -> host copy, made once."""
        if self._host is not None:
            return self._host
        drafts, parents = [list(ids) for ids in self.drafts], []
        if self.tokens is not None:
            flat = self.tokens.tolist()
            if self.parents is None:
                for b, count in zip(self.rows, self.counts):
                    drafts[b], flat = flat[:count], flat[count:]
            else:
                parents = [[] for _ in drafts]
                for n, (b, count, tree) in enumerate(zip(self.rows, self.counts, self.parents.tolist())):
                    drafts[b], parents[b] = flat[n][:count], tree[:count + 1]
        self._host = drafts, parents
        return self._host


class EagleDrafter:
    """The draft head, its KV pool and each row's pending features."""

    def __init__(self, path: str, target: torch.nn.Module, ops, num_slots: int, context_len: int,
                 dtype: torch.dtype, device: torch.device, aux_layer_ids: list[int] | None = None,
                 topk: int = 1, steps: int = 1, load_format: str = "auto", seed: int = 0) -> None:
        decoder = getattr(target, "model", None)
        if hasattr(target, "encode") or not hasattr(decoder, "capture_layers"):  # vision-language: not yet
            raise ValueError(f"{type(target).__name__} exposes no hidden states for EAGLE drafting")
        self.head: EagleHead = load_eagle_head(path, ops, dtype, device, load_format, seed)
        self.head.cover_positions(context_len)
        lm_head = getattr(target, "lm_head", None)
        absent = self.head.absent
        self.head.share_target_weights(
            decoder.embed_tokens.weight if "embed_tokens.weight" in absent else None,
            lm_head.weight if lm_head is not None and "lm_head.weight" in absent else None)
        num_layers = len(decoder.layers)
        if self.head.config.kind == "eagle3":
            self.layers = eagle3_layers(num_layers, aux_layer_ids)
        else:
            self.layers = (num_layers,)
        decoder.capture_layers = tuple(sorted(set(self.layers)))
        self.decoder, self.device = decoder, device
        c = self.head.config.layer
        self.kv_cache = KVCache.allocate(1, num_slots, c.num_key_value_heads, c.head_dim, dtype, device)
        self.pending: dict[int, _Pending] = {}  # req_to_token row -> features fed last step
        self.graphs = None  # graphs.DraftGraphs: the head's steps per batch-size bucket (ModelRunner.use_graphs)
        self.topk, self.steps = topk, steps     # trees when topk > 1 (module docstring)
        # pruning and tree layout on the device: the Triton kernel, or its PyTorch reference
        self.build_tree = (draft_tree.build_draft_tree if ops.backend == "triton"
                           else draft_tree.build_draft_tree_reference)

    @staticmethod
    def of(args, target: torch.nn.Module, ops, num_slots: int, context_len: int, dtype: torch.dtype,
           device: torch.device) -> "EagleDrafter | None":
        """The drafter of ``--speculative-algorithm EAGLE|EAGLE3`` (None for the others)."""
        if args.speculative_algorithm not in ("EAGLE", "EAGLE3"):
            return None
        path = Path(args.speculative_draft_model_path)
        raw = read_json(path / "config.json", f"config.json in {path}")
        aux = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        steps = tree_steps(args.speculative_num_steps, args.speculative_num_draft_tokens)
        drafter = EagleDrafter(str(path), target, ops, num_slots, context_len, dtype, device, aux,
                               topk=args.speculative_eagle_topk, steps=steps, load_format=args.load_format,
                               seed=args.random_seed)
        if drafter.head.config.kind != args.speculative_algorithm.lower():
            raise ValueError(f"--speculative-algorithm {args.speculative_algorithm}: {path} holds an "
                             f"{drafter.head.config.kind.upper()} head")
        return drafter

    # ------------------------------------------------------------------ features
    def _features(self) -> torch.Tensor:
        """[T, F] of the forward just run (EAGLE3: low, mid, high concatenated)."""
        by_layer = dict(zip(self.decoder.capture_layers, self.decoder.captured))
        return torch.cat([by_layer[i] for i in self.layers], dim=-1)

    @torch.inference_mode()
    def keep(self, batch: ForwardBatch, input_ids: torch.Tensor, req_to_token: torch.Tensor,
             offsets: list[int] | None = None) -> None:
        """After the target forward, per row: a row without drafts knows the next token of all
        its positions but the last, so the head runs over those at once and only the last
        position's features wait; a verifying row keeps all of them (kept copies: the
        batch's tensors are not held). ``offsets``: each row's first q row on the device
        when not packed one after another (a verify graph's padded rows)."""
        features, ready = self._features(), []
        draft_ids = batch.sampling.draft_ids
        starts = _starts(batch.extend_lens)
        for b, length in enumerate(batch.extend_lens):
            row, first, start = batch.req_pool_indices[b], batch.positions[starts[b]], (offsets or starts)[b]
            fed, feats = input_ids[start:start + length], features[start:start + length]
            if length > 1 and not (draft_ids and draft_ids[b]):
                ready.append(_Segment(b, row, first, length - 1, fed[1:], feats[:-1]))
                first, fed, feats = first + length - 1, fed[-1:], feats[-1:]
            self.pending[row] = _Pending(batch.rids[b], first, feats.clone(), fed.clone())
        if ready:
            self._catch_up(ready, req_to_token)

    # ------------------------------------------------------------------ drafting
    @torch.inference_mode()
    def draft(self, batch: ForwardBatch, input_ids: torch.Tensor, req_to_token: torch.Tensor,
              positions: torch.Tensor | None = None, offsets: list[int] | None = None,
              mask: tuple[torch.Tensor, int] | None = None) -> Drafted:
        """Fill each drafting row's draft positions of ``input_ids`` (device) with the head's
        chain or tree (trees also set their nodes' ``positions`` and their masks) and return
        the drafts, still on the device (``Drafted.host`` after the verify forward is
        launched; rows without usable context keep their placeholders). ``offsets``: as for
        ``keep``. ``mask``: a verify graph's static mask and its tokens per row (row b's
        block at ``b * tokens^2``, stride ``tokens``); without it trees get a mask of their own."""
        starts = offsets or _starts(batch.extend_lens)
        segments = self._catch_up_segments(batch, input_ids, starts)
        drafted = Drafted([list(ids) for ids in batch.sampling.draft_ids])
        if not segments:
            return drafted
        size = self.graphs.size_for(batch, segments, drafted.drafts) if self.graphs is not None else None
        if size is not None:
            return self._draft_by_graphs(size, segments, drafted, input_ids, positions, starts, mask)
        logits, hidden = self._catch_up(segments, req_to_token)
        if not drafted.drafts:
            return drafted
        if self.topk > 1:
            return self._fill_trees(segments, drafted, logits, hidden, req_to_token, input_ids, positions,
                                    starts, mask)
        first = self.head.draft_to_target(logits.argmax(-1))
        chains = self._chain(segments, drafted.drafts, first, hidden, req_to_token)
        if chains:  # one scatter into the inputs for every row's chain
            flat = torch.cat([chain for _, chain in chains])
            index = [starts[seg.b] + 1 + j for seg, chain in chains for j in range(chain.shape[0])]
            input_ids[torch.tensor(index, dtype=torch.int64).to(self.device)] = flat
            drafted.rows = [seg.b for seg, _ in chains]
            drafted.counts = [chain.shape[0] for _, chain in chains]
            drafted.tokens = flat
        return drafted

    def _draft_by_graphs(self, size: int, segments: list["_Segment"], drafted: Drafted, input_ids: torch.Tensor,
                         positions: torch.Tensor | None, starts: list[int],
                         mask: tuple[torch.Tensor, int] | None) -> Drafted:
        """``draft`` through the head's graphs of batch size ``size`` (``DraftGraphs``: batch row b
        is graph row b): the padded catch-up, then the chain or tree steps of every row at once."""
        self.graphs.catch_up(size, segments, drafted.drafts)
        rows = [seg.b for seg in segments if drafted.drafts and drafted.drafts[seg.b]]
        if not rows:
            return drafted
        if self.topk > 1:
            tokens, parents, scores = self.graphs.tree(size)
            picked = torch.tensor(rows, dtype=torch.int64).to(self.device)
            return self._lay_out_trees(rows, drafted, tokens[picked], parents[picked], scores[picked], input_ids,
                                       positions, starts, mask)
        chains = self.graphs.chain(size)                                     # [size, depth]
        counts = [len(drafted.drafts[b]) for b in rows]
        depth = chains.shape[1]
        index = torch.tensor([[b * depth + j for b, n in zip(rows, counts) for j in range(n)],
                              [starts[b] + 1 + j for b, n in zip(rows, counts) for j in range(n)]],
                             dtype=torch.int64).to(self.device)
        flat = chains.flatten()[index[0]]
        input_ids[index[1]] = flat
        return dataclasses.replace(drafted, rows=rows, counts=counts, tokens=flat)

    def _catch_up_segments(self, batch: ForwardBatch, input_ids: torch.Tensor, starts: list[int]
                           ) -> list["_Segment"]:
        """The rows whose previous step's features can catch up, with their final positions
        (a verified tree's: the accepted path's nodes, ``batch.spec_kept``)."""
        kept = {(path.row, path.rid): path.nodes for path in batch.spec_kept}
        host_starts = _starts(batch.extend_lens)
        segments = []
        for b, rid in enumerate(batch.rids):
            row, q = batch.req_pool_indices[b], batch.positions[host_starts[b]]
            pending = self.pending.pop(row, None)
            if pending is None or pending.rid != rid or not pending.start < q <= pending.start + len(pending.tokens):
                continue
            count = q - pending.start
            first = input_ids[starts[b]:starts[b] + 1]
            nodes = kept.get((row, rid))
            if nodes is None:  # a chain, or a tree whose accepted path is its first nodes
                tokens, features = torch.cat([pending.tokens[1:count], first]), pending.features[:count]
            elif len(nodes) + 1 == count:
                path = torch.tensor([0] + nodes, dtype=torch.int64).to(self.device)
                tokens, features = torch.cat([pending.tokens[path[1:]], first]), pending.features[path]
            else:
                continue
            segments.append(_Segment(b, row, pending.start, count, tokens, features))
        return segments

    def _catch_up(self, segments: list["_Segment"], req_to_token: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """One extend forward of the head over every row's final positions -> (the head's logits
        at each segment's last position [S, draft vocab], its hidden there [S, H])."""
        ids = torch.cat([s.tokens for s in segments])
        features = torch.cat([s.features for s in segments])
        positions = torch.cat([torch.arange(s.start, s.start + s.count, device=self.device) for s in segments])
        slots = torch.cat([req_to_token[s.row, s.start:s.start + s.count].long() for s in segments])
        meta = self._meta("extend", req_to_token, [s.row for s in segments], [s.start for s in segments],
                          [s.count for s in segments], slots)
        logits, hidden = self.head(ids, features, positions, meta, self.kv_cache)
        return logits, hidden[meta.logits_indices]

    def catch_up_padded(self, ids: torch.Tensor, features: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor,
                        counts: torch.Tensor, tokens: int, req_to_token: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_catch_up`` at a fixed shape (the draft graphs' form): S rows of ``tokens`` q rows
        each, row s's ``counts[s]`` final positions from ``starts[s]`` first, then padding
        (the padding slot 0, a padding row has count 0 and req_to_token row 0; causal
        attention keeps padding out of the real positions) -> (logits at each row's last
        final position [S, draft vocab], the head's hidden there [S, H])."""
        num = rows.shape[0]
        index = torch.arange(num, device=self.device, dtype=torch.int64)
        column = torch.arange(tokens, device=self.device, dtype=torch.int64)
        positions = starts[:, None] + column[None, :]                                 # [S, tokens]
        slots = torch.where(column[None, :] < counts[:, None], req_to_token[rows[:, None], positions].long(), 0)
        last = index * tokens + (counts - 1).clamp(min=0)
        meta = AttentionMetadata(
            mode="extend", req_to_token=req_to_token, req_pool_indices=rows, prefix_lens=starts,
            extend_lens=torch.full_like(rows, tokens), extend_start_loc=index * tokens, seq_lens=starts + tokens,
            out_cache_loc=slots.flatten(), logits_indices=last, max_extend_len=tokens,
            max_seq_len=int(req_to_token.shape[1]))
        logits, hidden = self.head(ids, features, positions.flatten(), meta, self.kv_cache)
        return logits, hidden[last]

    def _chain(self, segments: list["_Segment"], wanted: list[list[int]], first: torch.Tensor,
               hidden: torch.Tensor, req_to_token: torch.Tensor) -> list[tuple["_Segment", torch.Tensor]]:
        """Draft steps 2..d of every drafting row -> (segment, its chain [d] on the device)."""
        drafting = [k for k, s in enumerate(segments) if wanted[s.b]]
        chains = {k: [first[k:k + 1]] for k in drafting}
        hidden_of = {k: hidden[k:k + 1] for k in drafting}
        depth = max((len(wanted[segments[k].b]) for k in drafting), default=0)
        for step in range(1, depth):
            active = [k for k in drafting if len(wanted[segments[k].b]) > step]
            rows = [segments[k].row for k in active]
            pos = [segments[k].start + segments[k].count - 1 + step for k in active]
            slots = torch.stack([req_to_token[r, p].long() for r, p in zip(rows, pos)])
            meta = self._meta("decode", req_to_token, rows, pos, [1] * len(active), slots)
            ids = torch.cat([chains[k][-1] for k in active])
            logits, out = self.head(ids, torch.cat([hidden_of[k] for k in active]),
                                    torch.tensor(pos, device=self.device), meta, self.kv_cache)
            tokens = self.head.draft_to_target(logits.argmax(-1))
            for n, k in enumerate(active):
                chains[k].append(tokens[n:n + 1])
                hidden_of[k] = out[n:n + 1]
        return [(segments[k], torch.cat(chains[k])) for k in drafting]

    # ------------------------------------------------------------------ trees
    def _fill_trees(self, segments: list["_Segment"], drafted: Drafted, logits: torch.Tensor,
                    hidden: torch.Tensor, req_to_token: torch.Tensor, input_ids: torch.Tensor,
                    positions: torch.Tensor, starts: list[int], mask: tuple[torch.Tensor, int] | None) -> Drafted:
        """Draft a tree per drafting row and lay it out on the device (``build_tree``: pruned to
        the row's draft count, nodes into its inputs and positions, its mask)."""
        drafting = [k for k, s in enumerate(segments) if drafted.drafts[s.b]]
        if not drafting:
            return drafted
        picked = torch.tensor(drafting, dtype=torch.int64).to(self.device)
        chosen = [segments[k] for k in drafting]
        roots = [s.start + s.count for s in chosen]                        # q: the prefix length
        ints = torch.tensor([[s.row for s in chosen], roots], dtype=torch.int64).to(self.device)
        tokens, parents, scores = self.grow_trees(ints[0], ints[1], logits[picked], hidden[picked], req_to_token,
                                                  max(roots))
        return self._lay_out_trees([seg.b for seg in chosen], drafted, tokens, parents, scores, input_ids,
                                   positions, starts, mask)

    def _lay_out_trees(self, rows: list[int], drafted: Drafted, tokens: torch.Tensor, parents: torch.Tensor,
                       scores: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, starts: list[int],
                       mask: tuple[torch.Tensor, int] | None) -> Drafted:
        """Prune batch rows ``rows``' candidates ([len(rows), C] each) to their draft counts and lay
        the trees out on the device (``build_tree``: nodes into the inputs and positions, masks)."""
        counts = [len(drafted.drafts[b]) for b in rows]
        if max(counts) > tokens.shape[1]:  # the schedule stage sizes drafts within the candidates
            raise RuntimeError(f"{max(counts)} draft slots for trees of {tokens.shape[1]} candidates")
        if mask is None:  # a mask of our own: row n's block (stride its size) at n * N^2
            width = max(counts) + 1
            tree_mask = torch.empty(len(rows) * width * width, dtype=torch.bool, device=self.device)
            mask_starts, strides = [n * width * width for n in range(len(rows))], [c + 1 for c in counts]
        else:
            tree_mask, width = mask
            mask_starts, strides = [b * width * width for b in rows], [width] * len(rows)
        ints = torch.tensor([counts, [starts[b] for b in rows], mask_starts, strides],
                            dtype=torch.int64).to(self.device)
        out_tokens, out_parents = self.build_tree(tokens, parents, scores, ints[0], input_ids, positions, ints[1],
                                                  tree_mask, ints[2], ints[3], max(counts), self.steps)
        return dataclasses.replace(drafted, rows=rows, counts=counts, tokens=out_tokens, parents=out_parents,
                                   tree_mask=tree_mask if mask is None else None, mask_starts=mask_starts)

    def grow_trees(self, rows: torch.Tensor, roots: torch.Tensor, logits: torch.Tensor, hidden: torch.Tensor,
                   req_to_token: torch.Tensor, max_root: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k expansion over ``steps`` for S rows at once (req_to_token ``rows`` [S], prefix
        lengths ``roots`` [S], both on the device; ``max_root`` bounds them) -> the candidates'
        target token ids, parents (0 the root, candidate c is node c + 1) and cumulative
        log-probs, each [S, C] with C = k + (steps - 1) k^2, in creation order (parents come
        first). Shapes depend only on S, so a draft graph captures it (``DraftGraphs``)."""
        k, num = self.topk, rows.shape[0]
        score, ids = torch.log_softmax(logits.float(), -1).topk(k, dim=-1)   # [S, k] depth 1
        ids = self.head.draft_to_target(ids)
        cand_tokens, cand_parents, cand_scores = [ids], [torch.zeros_like(ids)], [score]
        frontier_node = torch.arange(1, k + 1, device=self.device).expand(num, k)  # node ids
        fed_ids, fed_hidden = ids, hidden[:, None, :].expand(num, k, hidden.shape[-1])
        fed_mask = torch.eye(k, dtype=torch.bool, device=self.device).expand(num, k, k)
        for step in range(1, self.steps):
            out_logits, out_hidden = self._tree_step(rows, roots, fed_ids, fed_hidden, fed_mask, step, req_to_token,
                                                     max_root)
            lp = torch.log_softmax(out_logits.float(), -1).view(num, k, -1) + score[:, :, None]
            child_score, child_ids = lp.topk(k, dim=-1)                          # [S, k, k]
            child_ids = self.head.draft_to_target(child_ids.view(num, k * k))
            child_score = child_score.view(num, k * k)
            first_new = 1 + sum(t.shape[1] for t in cand_tokens)
            cand_tokens.append(child_ids)
            cand_parents.append(frontier_node.repeat_interleave(k, dim=1))
            cand_scores.append(child_score)
            score, pick = child_score.topk(k, dim=-1)                            # the next frontier
            frontier_node = first_new + pick
            parent_local = torch.div(pick, k, rounding_mode="floor")             # which frontier node
            fed_len = fed_ids.shape[1]
            parent_fed = fed_len - k + parent_local                              # its row among the fed
            fed_ids = torch.cat([fed_ids, child_ids.gather(1, pick)], dim=1)
            new_hidden = out_hidden.view(num, fed_len, -1).gather(
                1, parent_fed[:, :, None].expand(num, k, out_hidden.shape[-1]))
            fed_hidden = torch.cat([fed_hidden, new_hidden], dim=1)
            ancestors = fed_mask.gather(1, parent_fed[:, :, None].expand(num, k, fed_len))  # the parents'
            mask = torch.zeros(num, fed_len + k, fed_len + k, dtype=torch.bool, device=self.device)
            mask[:, :fed_len, :fed_len] = fed_mask
            mask[:, fed_len:, :fed_len] = ancestors
            mask[:, fed_len:, fed_len:] = torch.eye(k, dtype=torch.bool, device=self.device)
            fed_mask = mask
        return torch.cat(cand_tokens, 1), torch.cat(cand_parents, 1), torch.cat(cand_scores, 1)

    def _tree_step(self, rows: torch.Tensor, roots: torch.Tensor, fed_ids: torch.Tensor, fed_hidden: torch.Tensor,
                   fed_mask: torch.Tensor, step: int, req_to_token: torch.Tensor, max_root: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head over every frontier node chosen so far (``step`` frontiers of k, node j of
        frontier d at position ``q - 1 + d``, q = ``roots``) under their ancestor masks ->
        (logits of the newest frontier [S * k, draft vocab], hidden of every fed node [S * n, H])."""
        num, n = fed_ids.shape
        k = self.topk
        depth = torch.arange(1, step + 1, device=self.device).repeat_interleave(k)    # [n]
        positions = ((roots - 1)[:, None] + depth[None, :]).flatten()
        slots = torch.zeros(num * n, dtype=torch.int64, device=self.device)          # the padding slot
        index = torch.arange(num, device=self.device, dtype=torch.int64)
        last = index[:, None] * n + torch.arange(n - k, n, device=self.device)
        meta = AttentionMetadata(
            mode="extend", req_to_token=req_to_token, req_pool_indices=rows, prefix_lens=roots,
            extend_lens=torch.full_like(rows, n), extend_start_loc=index * n, seq_lens=roots + n,
            out_cache_loc=slots, logits_indices=last.flatten(), max_extend_len=n, max_seq_len=max_root + n,
            tree_mask=fed_mask.flatten(), mask_start_loc=index * n * n)
        # a copy: EAGLE3's layer adds into its input hidden in place (the residual)
        features = fed_hidden.reshape(num * n, -1).clone()
        logits, out = self.head(fed_ids.flatten(), features, positions, meta, self.kv_cache)
        return logits, out

    def chain_steps(self, rows: torch.Tensor, roots: torch.Tensor, counts: torch.Tensor, logits: torch.Tensor,
                    hidden: torch.Tensor, req_to_token: torch.Tensor, depth: int) -> torch.Tensor:
        """Chains of ``depth`` drafts for S rows at once (the draft graphs' form of ``_chain``):
        row s drafts from the catch-up's ``logits[s]`` and ``hidden[s]`` at prefix length
        ``roots[s]``; step j (1 .. depth - 1) runs the head as a decode step over every row,
        a row with ``counts[s] <= j`` (padding: 0) as the dummy row 0 at position 0 writing
        the padding slot 0, so no row writes past its own draft slots -> [S, depth] target ids
        (a row's first ``counts[s]`` are its chain)."""
        index = torch.arange(rows.shape[0], device=self.device, dtype=torch.int64)
        tokens = [self.head.draft_to_target(logits.argmax(-1))]
        hidden = hidden.clone()  # EAGLE3's layer adds into its input hidden in place
        for step in range(1, depth):
            active = counts > step
            pos = torch.where(active, roots - 1 + step, 0)
            row = torch.where(active, rows, 0)
            slots = torch.where(active, req_to_token[row, pos].long(), 0)
            meta = AttentionMetadata(
                mode="decode", req_to_token=req_to_token, req_pool_indices=row, prefix_lens=pos,
                extend_lens=torch.ones_like(pos), extend_start_loc=index, seq_lens=pos + 1, out_cache_loc=slots,
                logits_indices=index, max_extend_len=1, max_seq_len=int(req_to_token.shape[1]))
            step_logits, hidden = self.head(tokens[-1], hidden, pos, meta, self.kv_cache)
            tokens.append(self.head.draft_to_target(step_logits.argmax(-1)))
        return torch.stack(tokens, dim=1)

    def _meta(self, mode: str, req_to_token: torch.Tensor, req_rows: list[int], prefix_lens: list[int],
              extend_lens: list[int], slots: torch.Tensor) -> AttentionMetadata:
        def i64(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        starts = _starts(extend_lens)
        seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens)]
        return AttentionMetadata(
            mode=mode, req_to_token=req_to_token, req_pool_indices=i64(req_rows), prefix_lens=i64(prefix_lens),
            extend_lens=i64(extend_lens), extend_start_loc=i64(starts), seq_lens=i64(seq_lens),
            out_cache_loc=slots, logits_indices=i64([s + n - 1 for s, n in zip(starts, extend_lens)]),
            max_extend_len=max(extend_lens), max_seq_len=max(seq_lens))


def _starts(lengths: list[int]) -> list[int]:
    starts, offset = [], 0
    for length in lengths:
        starts.append(offset)
        offset += length
    return starts
