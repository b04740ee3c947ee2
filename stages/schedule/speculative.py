"""Speculative decoding in the schedule stage: draft, take KV for the drafts, keep what was accepted.

``--speculative-algorithm NGRAM``: every decode step, each eligible request
proposes a chain of up to ``--speculative-num-steps`` tokens from its own
history (``stages/speculative/ngram.py``: the most frequent continuation of
the longest suffix seen before). Its row then feeds the last token and the
drafts (``PlannedRow.drafts``, ``SamplingBatch.draft_ids``), one target
forward computes all of them -- causal attention over a chain is the draft
tree's mask, so the ordinary extend path serves it -- and the sample stage
verifies (``stages/speculative/chain_verify.py``). A row emits between 1
and ``drafts + 1`` tokens.

KV. The drafts get slots at their sequence positions (``KVManager.grow``),
so the accepted drafts' K/V is already where the sequence needs it and
nothing moves; after verification the slots past the accepted run are
given back (``KVManager.trim``). Drafts only take KV that is free (or
evictable) after the ordinary decode planning -- retraction decides over
one token per request as without speculation, and under KV pressure rows
simply draft fewer tokens (or none).

Who drafts (``eligible``): a running decode that is not grammar-constrained
(its mask needs the grammar advanced token by token on the host), asks for
no penalties (their counts would have to include the drafts) and no
logprobs, has no media (M-RoPE positions), is past ``min_new_tokens`` and has
room for at least two more tokens. The rest decode as usual in the same
batch.

Overlap scheduling. A step planned ahead would have to draft before the
step in flight returns its token. The rule here is the simple exact one:
while any running request may draft, steps are planned synchronously (no
run-ahead); overlap resumes when none can.

Exactness. Stop tokens, EOS and ``max_new_tokens`` are checked token by
token over an accepted run, and the first finish cuts the rest; stop
strings are cut by the detokenizer as for any multi-token output.

EAGLE / EAGLE3: the drafts come from a draft head over the target's hidden
states, which live in the forward stage; the rows are planned the same way
with ``PLACEHOLDER_DRAFT`` ids, and the forward stage replaces them before
the target runs and reports the real ones to the sample stage
(``stages/forward/speculative.py``).

NGRAM trees (``--speculative-eagle-topk`` k > 1): the n-gram index merges the
continuations of the longest matched suffix into a trie, k children per node
kept, pruned to the draft count by frequency; the row carries the tree's
parents (``PlannedRow.draft_parents`` -> ``SamplingBatch.draft_parents``),
its drafts sit at rotary positions ``start + depth``, and the forward stage
verifies it under its mask like an EAGLE tree.

Draft trees (EAGLE/EAGLE3 with ``--speculative-eagle-topk`` > 1). A row takes
``--speculative-num-draft-tokens - 1`` draft slots, at the sequence positions
after its last token, and the forward stage fills them with the nodes of a
draft tree (node ``i``'s K/V lands in the slot of position ``start + i``, its
rotary position is ``start + depth``). Verification keeps a root-to-node
path, which need not be the first nodes: ``after_step`` records the path
(``KeptPath``) and the next ForwardBatch carries it, so the forward stage
copies the accepted nodes' K/V to positions ``start + 1 ..`` before it
writes anything -- including when the request finished or was retracted
meanwhile, as the radix cache may already hold those slots. The slots past
the kept run are trimmed as for chains, so the pool accounting is the same.

Metrics: per request, verify steps (SGLang's ``spec_verify_ct``) and
accepted drafts, on every TokenOutput; ``accept_lengths`` collects the
tokens each verify step emitted for the /metrics histogram.
"""
from __future__ import annotations

import dataclasses

import msgspec

from pipeline.config import ServerArgs
from pipeline.messages import FinishReason, KeptPath, TokenOutput
from stages.schedule.kv_manager import KVManager
from stages.schedule.req_table import Req
from stages.speculative.ngram import NgramIndex, NgramParams
from stages.speculative.tree import num_draft_slots

PLACEHOLDER_DRAFT = 0  # EAGLE/EAGLE3 drafts as planned, before the forward stage fills them in


@dataclasses.dataclass
class _SpecState:
    index: NgramIndex
    verify_ct: int = 0
    accepted: int = 0


def num_drafts(args: ServerArgs) -> int:
    """Draft tokens per step (``stages/speculative/tree.num_draft_slots``)."""
    return num_draft_slots(args.speculative_num_steps, args.speculative_num_draft_tokens, args.speculative_eagle_topk)


class Speculator:
    """Per-request n-gram indexes and counts; drafts for planned decode rows."""

    def __init__(self, args: ServerArgs) -> None:
        self.max_drafts = num_drafts(args)
        # NGRAM trees: --speculative-eagle-topk continuations per node (1: a chain)
        self.params = NgramParams(num_draft_tokens=self.max_drafts + 1, branch_top_k=args.speculative_eagle_topk)
        self.states: dict[str, _SpecState] = {}
        self.accept_lengths: list[int] = []  # tokens emitted per verify step, since last taken
        self.total_verify_ct = 0  # over every request served (tests and logs)
        self.total_accepted = 0
        # (req, max drafts) -> drafts, replacing the n-gram lookup (perf/bench_speculative.py's oracle)
        self.proposer = None
        # EAGLE/EAGLE3: the forward stage's draft head fills the drafts (stages/forward/speculative.py);
        # the schedule stage only sizes the chain and takes its KV
        self.by_forward = args.speculative_algorithm in ("EAGLE", "EAGLE3")
        self.kept: list[KeptPath] = []  # accepted tree paths for the next batch (module docstring)

    @staticmethod
    def of(args: ServerArgs) -> "Speculator | None":
        return Speculator(args) if args.speculative_algorithm else None

    # ------------------------------------------------------------ planning
    def eligible(self, req: Req) -> bool:
        params = req.sampling
        return (not req.constrained and req.media is None and not params.return_logprob
                and params.repetition_penalty == 1.0 and params.frequency_penalty == 0.0
                and params.presence_penalty == 0.0 and req.output_len >= params.min_new_tokens
                and req.max_new_tokens - req.output_len >= 2)

    def any_eligible(self, reqs: list[Req]) -> bool:
        return any(not r.is_prefilling and self.eligible(r) for r in reqs)

    def add_drafts(self, kv: KVManager, rows: list) -> None:
        """Draft for each eligible decode row (``PlannedRow``), taking KV slots for the drafts."""
        for row in rows:
            req = row.req
            if row.is_prefill or req.pending_tokens or not self.eligible(req):
                continue
            drafts, parents = self._propose(req)
            drafts = drafts[: req.max_new_tokens - req.output_len - 1]  # nodes in topological order
            while drafts and kv.tokens_to_grow(req, len(drafts)) > kv.available_tokens:
                drafts.pop()
            if drafts and kv.grow(req, len(drafts)) is not None:
                row.drafts = drafts
                row.draft_parents = parents[:len(drafts) + 1] if parents else []
                row.extend_len = 1 + len(drafts)

    def _propose(self, req: Req) -> tuple[list[int], list[int]]:
        """(drafts, their tree's parents root first -- [] for a chain)."""
        state = self.states.get(req.rid)
        if state is None:
            state = self.states[req.rid] = _SpecState(NgramIndex(self.params))
        if self.proposer is not None:
            return list(self.proposer(req, self.max_drafts)), []
        if self.by_forward:
            return [PLACEHOLDER_DRAFT] * self.max_drafts, []
        index = state.index
        history = len(req.input_ids) + len(req.output_ids)
        if len(index) < history:  # catch up with the tokens emitted since the last draft
            index.extend((req.input_ids + req.output_ids)[len(index):])
        tree = index.propose()
        if tree.parents == list(range(-1, len(tree.parents) - 1)):
            return tree.tokens[1:], []  # a chain
        return tree.tokens[1:], tree.parents

    # ------------------------------------------------------------ results
    def after_step(self, kv: KVManager, req: Req, drafted: int, verified: list[int], emitted: int,
                   reason: FinishReason | None, nodes: list[int] | None = None) -> None:
        """Count a verify step of ``drafted`` drafts whose row produced ``verified`` (accepted
        drafts, then the target's token) of which ``emitted`` were kept (a finish cuts the
        rest); give back the KV of the rejected drafts (a finished request frees it all).
        ``nodes``: a tree's accepted node ids; a path that is not ``1, 2, ...`` is recorded
        for the next batch, which moves its K/V into place."""
        if not drafted:
            return
        path = list(nodes or [])[:max(emitted - 1, 0)]
        if path != list(range(1, len(path) + 1)):
            start = len(req.input_ids) + len(req.output_ids) - emitted - 1  # the root's position
            self.kept.append(KeptPath(row=req.row, rid=req.rid, start=start, nodes=path))
        state = self.states[req.rid]
        accepted = min(len(verified) - 1, emitted)
        state.verify_ct += 1
        state.accepted += accepted
        self.total_verify_ct += 1
        self.total_accepted += accepted
        self.accept_lengths.append(emitted)
        if reason is None:
            kv.trim(req, req.seq_len - 1)  # the last emitted token is fed (and stored) next step

    def annotate(self, output: TokenOutput) -> TokenOutput:
        state = self.states.get(output.rid)
        if state is None or not state.verify_ct:
            return output
        return msgspec.structs.replace(output, spec_verify_ct=state.verify_ct,
                                       spec_accepted_tokens=state.accepted)

    def take_kept(self) -> list[KeptPath]:
        """The paths the next ForwardBatch carries (each goes out once)."""
        kept, self.kept = self.kept, []
        return kept

    def forget(self, rid: str) -> None:
        self.states.pop(rid, None)

    def take_accept_lengths(self) -> list[int]:
        lengths, self.accept_lengths = self.accept_lengths, []
        return lengths
