"""EAGLE / EAGLE3 drafting inside the forward stage: a chain of draft tokens per verifying row.

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

Only the draft quality depends on the head's context; the output never
does (the sample stage verifies every draft against the target). A row
without usable features (a radix hit's last cached position, a retracted
and resumed request) keeps its placeholder drafts, which verification
rejects unless they happen to match. CUDA graphs are not used while EAGLE
drafts (the model's captured features are per-forward tensors).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from models.batch import AttentionMetadata, KVCache
from models.config import read_json
from models.eagle import EagleHead, load_eagle_head
from pipeline.messages import ForwardBatch


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


class EagleDrafter:
    """The draft head, its KV pool and each row's pending features."""

    def __init__(self, path: str, target: torch.nn.Module, ops, num_slots: int, context_len: int,
                 dtype: torch.dtype, device: torch.device, aux_layer_ids: list[int] | None = None) -> None:
        decoder = getattr(target, "model", None)
        if hasattr(target, "encode") or not hasattr(decoder, "capture_layers"):  # vision-language: not yet
            raise ValueError(f"{type(target).__name__} exposes no hidden states for EAGLE drafting")
        self.head: EagleHead = load_eagle_head(path, ops, dtype, device)
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

    @staticmethod
    def of(args, target: torch.nn.Module, ops, num_slots: int, context_len: int, dtype: torch.dtype,
           device: torch.device) -> "EagleDrafter | None":
        """The drafter of ``--speculative-algorithm EAGLE|EAGLE3`` (None for the others)."""
        if args.speculative_algorithm not in ("EAGLE", "EAGLE3"):
            return None
        path = Path(args.speculative_draft_model_path)
        raw = read_json(path / "config.json", f"config.json in {path}")
        aux = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        drafter = EagleDrafter(str(path), target, ops, num_slots, context_len, dtype, device, aux)
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
    def keep(self, batch: ForwardBatch, input_ids: torch.Tensor, req_to_token: torch.Tensor) -> None:
        """After the target forward, per row: a row without drafts knows the next token of all
        its positions but the last, so the head runs over those at once and only the last
        position's features wait; a verifying row keeps all of them (kept copies: the
        batch's tensors are not held)."""
        features, start, ready = self._features(), 0, []
        draft_ids = batch.sampling.draft_ids
        for b, length in enumerate(batch.extend_lens):
            row, first = batch.req_pool_indices[b], batch.positions[start]
            fed, feats = input_ids[start:start + length], features[start:start + length]
            if length > 1 and not (draft_ids and draft_ids[b]):
                ready.append(_Segment(b, row, first, length - 1, fed[1:], feats[:-1]))
                first, fed, feats = first + length - 1, fed[-1:], feats[-1:]
            self.pending[row] = _Pending(batch.rids[b], first, feats.clone(), fed.clone())
            start += length
        if ready:
            self._catch_up(ready, req_to_token)

    # ------------------------------------------------------------------ drafting
    @torch.inference_mode()
    def draft(self, batch: ForwardBatch, input_ids: torch.Tensor, req_to_token: torch.Tensor
              ) -> list[list[int]]:
        """Fill each drafting row's draft positions of ``input_ids`` (device) with the head's
        chain; return the drafts per row (the placeholders where no context was usable)."""
        starts = _starts(batch.extend_lens)
        segments = self._catch_up_segments(batch, input_ids, starts)
        drafts = [list(ids) for ids in batch.sampling.draft_ids]
        if not segments:
            return drafts
        first, hidden = self._catch_up(segments, req_to_token)
        if not drafts:
            return drafts
        chains = self._chain(segments, drafts, first, hidden, req_to_token)
        for segment, chain in chains:
            input_ids[starts[segment.b] + 1: starts[segment.b] + 1 + chain.shape[0]] = chain
        if chains:  # one device -> host copy for every row's chain
            flat = torch.cat([chain for _, chain in chains]).tolist()
            for segment, chain in chains:
                drafts[segment.b], flat = flat[:chain.shape[0]], flat[chain.shape[0]:]
        return drafts

    def _catch_up_segments(self, batch: ForwardBatch, input_ids: torch.Tensor, starts: list[int]
                           ) -> list["_Segment"]:
        """The rows whose previous step's features can catch up, with their final positions."""
        segments = []
        for b, rid in enumerate(batch.rids):
            row, q = batch.req_pool_indices[b], batch.positions[starts[b]]
            pending = self.pending.pop(row, None)
            if pending is None or pending.rid != rid or not pending.start < q <= pending.start + len(pending.tokens):
                continue
            count = q - pending.start
            tokens = torch.cat([pending.tokens[1:count], input_ids[starts[b]:starts[b] + 1]])
            segments.append(_Segment(b, row, pending.start, count, tokens, pending.features[:count]))
        return segments

    def _catch_up(self, segments: list["_Segment"], req_to_token: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """One extend forward of the head over every row's final positions -> (first draft per
        segment [S] in target ids, the head's hidden at each segment's last position [S, H])."""
        ids = torch.cat([s.tokens for s in segments])
        features = torch.cat([s.features for s in segments])
        positions = torch.cat([torch.arange(s.start, s.start + s.count, device=self.device) for s in segments])
        slots = torch.cat([req_to_token[s.row, s.start:s.start + s.count].long() for s in segments])
        meta = self._meta("extend", req_to_token, [s.row for s in segments], [s.start for s in segments],
                          [s.count for s in segments], slots)
        logits, hidden = self.head(ids, features, positions, meta, self.kv_cache)
        return self.head.draft_to_target(logits.argmax(-1)), hidden[meta.logits_indices]

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
