"""CUDA graphs for decode and speculative verify batches: capture once per bucket, replay each step.

A decode step of a small batch is dominated by kernel launch overhead (a few
hundred launches of microsecond kernels). Capturing the whole step -- the
req_to_token write, every layer, the LM head -- into a CUDA graph turns it
into one launch. Graphs are captured for sizes ``1, 2, 4, 8, 16, 24, ...,
--cuda-graph-max-bs``; a batch of B requests replays the smallest captured
size >= B, its extra rows padded: token 0 at position 0, KV slot 0 (the
reserved padding slot), req_to_token row 0 (the dummy row), seq_len 1.

Each captured size owns a static int64 buffer laid out like
``inputs.pack_batch`` (B = T for decode) and a static logits output. A replay
is: one host->device copy into the static buffer, ``graph.replay()``, and a
view of the first B logits rows. Every kernel reads its sizes from the
static shapes (decode attention's split count depends only on the pool row
length), so a captured graph is valid for any request lengths.

Speculative verify (``VerifyGraphs``): a verify batch feeds each row's last
token and its drafts (a chain, or an EAGLE tree under its mask). It is
captured per (batch size B, tokens per row N) bucket, ``N`` from
``verify_token_buckets`` (2, 4, 8 below the configured root + drafts, and
that count). Row b owns the N q rows ``b*N ..``; a row with fewer tokens is
padded after its last one (token 0, KV slot 0, position of its last token)
and padded rows are the dummy row as for decode. Its static buffer::

    input_ids[T] positions[T] out_cache_loc[T] logits_indices[T]
    req_pool_indices[B] prefix_lens[B] extend_lens[B] (all N) extend_start_loc[B] (b*N)
    seq_lens[B] mask_start_loc[B] (b*N*N)                      T = B*N

``logits_indices`` lists the rows the sample stage reads, in the order an
eager batch returns them (each row's last token, then each row's draft
positions, ``inputs.draft_logit_rows``), then filler; a replay returns the
first rows of the static logits. Trees add a static ``[B*N*N]`` mask
(``clear_mask`` resets it to the causal triangle on the device and the EAGLE
drafter draws each row's tree into its block; ``set_mask`` writes host
parents; a row without a tree, and every padded node, keeps the causal
triangle), and the model runs tree attention; chains run extend attention.
Padding writes ``req_to_token[row, prefix + L .. prefix + N - 1]`` (slot 0)
for a row of L tokens: entries past the row's sequence, rewritten before
they are read; a row whose ``prefix + N`` passes the table's width is not
served by a graph.

Each graph of a model that keeps features for an EAGLE head
(``DecoderModel.capture_layers``) also keeps the static feature tensors its
capture produced (``features``), which hold the replay's features.

EAGLE / EAGLE3 head steps (``DraftGraphs``): per decode batch-size bucket S,
one graph per step kind, each replayed once per speculative step:

* ``catch_up``: the head over each row's final positions, padded to a fixed
  ``tokens`` (the verify root + drafts) q rows per row: row b of the batch
  is graph row b, its ``count`` final positions first, then padding written
  to slot 0 (the padding slot; rows past the batch are the dummy row 0 with
  count 0). Static inputs: ``ids[S*tokens]``, ``features[S*tokens, F]``
  (filled by one device scatter each from the pending features) and
  ``ints[4*S]`` = rows, starts, counts, draft counts (one upload);
  positions, slots and the attention layout are computed inside the graph.
  A batch whose catch-up needs more than ``tokens`` positions, or reaches
  past the req_to_token row or the head's rotary table, drafts eagerly.
* ``chain`` (topk 1): every row's ``depth - 1`` draft decode steps from the
  catch-up's outputs; a row past its draft count (or padding) runs as the
  dummy row at position 0 writing slot 0 -> ``[S, depth]`` drafts.
* ``tree`` (topk > 1): the whole top-k expansion (``steps - 1`` tree steps,
  frontier bookkeeping included; the nodes write only slot 0) -> the
  candidates' tokens, parents and scores ``[S, C]``; rows without drafts run
  as the dummy row with an empty prefix. Pruning and layout
  (``triton_kernels/draft_tree.py``) stay one launch outside the graph, as
  they write into whichever verify graph's inputs serve the batch.

The catch-up of a prefill chunk's positions after the target forward
(``EagleDrafter.keep``) stays eager: its length is the chunk's.

``eager=True`` builds the same static buffers and runs the same padded
forward without capturing (``launch`` calls it directly): the CPU tests use it
to check the layouts and the runner's graph paths, which a CPU cannot capture.
"""
from __future__ import annotations

import torch

from models.batch import AttentionMetadata, KVCache
from pipeline.messages import ForwardBatch

FIELDS = 9  # input_ids positions out_cache_loc rows prefix_lens extend_lens start seq_lens logits_indices


def capture_sizes(max_bs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_bs]
    sizes += list(range(16, max_bs + 1, 8))
    if max_bs not in sizes:
        sizes.append(max_bs)
    return sizes


def pad_decode(input_ids: list[int], positions: list[int], out_cache_loc: list[int], rows: list[int],
               seq_lens: list[int], size: int) -> list[int]:
    """Packed decode inputs of a graph of ``size`` rows (padded rows: slot 0, row 0)."""
    pad = size - len(input_ids)
    zeros = [0] * pad
    ones = [1] * pad
    index = list(range(size))
    prefix_lens = [n - 1 for n in seq_lens]  # not ``positions``: M-RoPE decode shifts those by a delta
    return (input_ids + zeros + positions + zeros + out_cache_loc + zeros + rows + zeros
            + prefix_lens + zeros + [1] * size + index + seq_lens + ones + index)


class _TargetGraphs:
    """What the decode and verify graph sets share: one captured target forward per key, run by
    ``launch`` (subclasses hold ``model``, ``eager``, ``graphs``, ``outputs``, ``features`` and ``_run``)."""

    def launch(self, key, num_rows: int) -> torch.Tensor:
        """Replay ``key``'s graph (eager: run its forward) -> the first ``num_rows`` logits rows."""
        if self.eager:
            self.outputs[key] = self._run(key)
            self.features[key] = kept_features(self.model)
        else:
            self.graphs[key].replay()
        return self.outputs[key][:num_rows]


class DecodeGraphs(_TargetGraphs):
    """Captured decode steps, one per batch size, sharing one memory pool."""

    def __init__(self, model, kv_cache: KVCache, req_to_token: torch.Tensor, write_fn,
                 max_bs: int, device: torch.device, uploader, resolve_fn=None, eager: bool = False) -> None:
        self.model, self.kv_cache, self.req_to_token = model, kv_cache, req_to_token
        self.eager = eager
        self.features: dict[int, list[torch.Tensor]] = {}  # size -> the capture's kept features
        self.write_fn = write_fn
        self.resolve_fn = resolve_fn  # input_ids -> None: future token ids resolved in place
        self.device = device
        self.uploader = uploader  # stages.staging.Uploader: pinned host buffers, reused
        self.sizes = capture_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.buffers: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    @torch.inference_mode()
    def capture_all(self) -> None:
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its pool
            self.buffers[size] = torch.tensor(pad_decode([], [], [], [], [], size), dtype=torch.int64,
                                              device=self.device)
            if not self.eager:
                self.pool = capture(self, size, self.pool)

    def size_for_batch(self, batch: ForwardBatch) -> int | None:
        """The captured size serving a decode batch, or None (eager)."""
        if batch.mode != "decode" or batch.row_writes:
            return None
        return self.size_for(len(batch.rids))

    def _meta(self, size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        fields = self.buffers[size].view(FIELDS, size)
        meta = AttentionMetadata(
            mode="decode", req_to_token=self.req_to_token, req_pool_indices=fields[3],
            prefix_lens=fields[4], extend_lens=fields[5], extend_start_loc=fields[6], seq_lens=fields[7],
            out_cache_loc=fields[2], logits_indices=fields[8], max_extend_len=1,
            max_seq_len=int(self.req_to_token.shape[1]))
        return fields[0], fields[1], meta

    def _run(self, size: int) -> torch.Tensor:
        input_ids, positions, meta = self._meta(size)
        self.write_fn(meta)
        return self.model.forward(input_ids, positions, meta, self.kv_cache)

    def size_for(self, batch_size: int) -> int | None:
        for size in self.sizes:
            if size >= batch_size:
                return size
        return None

    def replay(self, packed: list[int], size: int, batch_size: int,
               future_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of the first ``batch_size`` rows, their req_pool_indices), both views of static tensors.

        With ``future_input`` the placeholders in the static input ids are resolved
        (one small kernel) before the replay; the graph itself never changes.
        """
        input_ids, _, rows = self.load(packed, size, future_input)
        return self.launch(size, batch_size), rows[:batch_size]

    def load(self, packed: list[int], size: int, future_input: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Upload a packed batch into ``size``'s buffer (placeholders resolved) -> its static
        (input_ids, positions, req_pool_indices) views, which an EAGLE head may read or edit."""
        buffer = self.buffers[size]
        self.uploader.upload_into(packed, buffer)
        fields = buffer.view(FIELDS, size)
        if future_input:
            self.resolve_fn(fields[0])
        return fields[0], fields[1], fields[3]


def kept_features(model) -> list[torch.Tensor]:
    """The features the model's decoder kept in its last forward (EAGLE heads read them)."""
    decoder = getattr(model, "model", None)
    return list(decoder.captured) if getattr(decoder, "capture_layers", ()) else []


def capture(graphs, key, pool):
    """Warm up and capture ``graphs._run(key)`` into ``graphs.graphs[key]`` (its logits in
    ``graphs.outputs[key]``, its kept features in ``graphs.features[key]``); returns the pool."""
    device = graphs.device
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: JIT-compile every kernel outside the capture
            graphs._run(key)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        graphs.outputs[key] = graphs._run(key)
    graphs.features[key] = kept_features(graphs.model)
    graphs.graphs[key] = graph
    torch.cuda.synchronize(device)
    return graph.pool()


# ----------------------------------------------------------------------------- verify
VERIFY_SMALL_BUCKETS = (2, 4, 8)


def verify_token_buckets(max_tokens: int) -> list[int]:
    """Tokens per row captured for verify: the small buckets below ``max_tokens``, then it."""
    return [n for n in VERIFY_SMALL_BUCKETS if n < max_tokens] + [max_tokens]


def pad_verify(batch: ForwardBatch, size: int, tokens: int) -> list[int]:
    """Packed inputs of a verify graph of ``size`` rows x ``tokens`` (module docstring)."""
    T = size * tokens
    input_ids, positions, slots, logits_rows = [0] * T, [0] * T, [0] * T, []
    at = 0
    for b, length in enumerate(batch.extend_lens):
        base = b * tokens
        input_ids[base:base + length] = batch.input_ids[at:at + length]
        positions[base:base + length] = batch.positions[at:at + length]
        positions[base + length:base + tokens] = [batch.positions[at + length - 1]] * (tokens - length)
        slots[base:base + length] = batch.out_cache_loc[at:at + length]
        logits_rows.append(base + length - 1)
        at += length
    for b, ids in enumerate(batch.sampling.draft_ids):
        logits_rows.extend(range(b * tokens, b * tokens + len(ids)))
    logits_rows += [0] * (T - len(logits_rows))
    real = len(batch.rids)
    pad = size - real
    prefix = list(batch.prefix_lens) + [0] * pad
    return (input_ids + positions + slots + logits_rows + list(batch.req_pool_indices) + [0] * pad + prefix
            + [tokens] * size + [b * tokens for b in range(size)] + [p + tokens for p in prefix]
            + [b * tokens * tokens for b in range(size)])


def verify_mask(extend_lens: list[int], parents: list[list[int]], size: int, tokens: int) -> torch.Tensor:
    """[size * tokens * tokens] bool: each row's tree mask in its ``tokens`` x ``tokens`` block
    (its first nodes), the causal triangle elsewhere (rows without a tree, padding)."""
    from stages.speculative.tree import build_tree_layout

    mask = torch.ones(size, tokens, tokens, dtype=torch.bool).tril()
    for b, tree in enumerate(parents):
        if tree:
            n = len(tree)
            mask[b, :n, :n] = build_tree_layout(tree).tree_mask
    return mask.flatten()


class VerifyGraphs(_TargetGraphs):
    """Captured verify steps, one per (batch size, tokens per row) bucket (module docstring)."""

    def __init__(self, model, kv_cache: KVCache, req_to_token: torch.Tensor, write_fn, max_bs: int,
                 max_tokens: int, tree: bool, device: torch.device, uploader, eager: bool = False) -> None:
        self.model, self.kv_cache, self.req_to_token = model, kv_cache, req_to_token
        self.write_fn, self.device, self.uploader = write_fn, device, uploader
        self.tree, self.eager = tree, eager
        self.sizes = capture_sizes(max_bs)
        self.token_buckets = verify_token_buckets(max_tokens)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}
        self.masks: dict[tuple[int, int], torch.Tensor] = {}
        self.causal: dict[tuple[int, int], torch.Tensor] = {}  # each mask as captured (all causal)
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.features: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.pool = None

    @torch.inference_mode()
    def capture_all(self, pool=None) -> None:
        """Capture every bucket, largest first, into ``pool`` (e.g. the decode graphs')."""
        self.pool = pool
        for size in reversed(self.sizes):
            for tokens in reversed(self.token_buckets):
                key = (size, tokens)
                self.buffers[key] = torch.zeros(size * (4 * tokens + 6), dtype=torch.int64, device=self.device)
                self.buffers[key][: size * tokens * 4 + size * 6] = torch.tensor(
                    _idle_verify(size, tokens), dtype=torch.int64)
                if self.tree:
                    self.causal[key] = verify_mask([], [], size, tokens).to(self.device)
                    self.masks[key] = self.causal[key].clone()
                if not self.eager:
                    self.pool = capture(self, key, self.pool)

    def key_for(self, batch: ForwardBatch) -> tuple[int, int] | None:
        """The bucket serving a verify batch (every row a decode, with or without drafts), or None."""
        sampling = batch.sampling
        if (batch.mode != "extend" or batch.row_writes or batch.mm is not None or not sampling.draft_ids
                or sampling.prompt_logprob_ids or batch.future_input):
            return None
        if any(n > 1 and not ids for n, ids in zip(batch.extend_lens, sampling.draft_ids)):
            return None  # a prefill chunk rides along
        longest = max(batch.extend_lens)
        tokens = next((n for n in self.token_buckets if n >= longest), None)
        size = next((s for s in self.sizes if s >= len(batch.rids)), None)
        if tokens is None or size is None:
            return None
        if max(batch.prefix_lens) + tokens > self.req_to_token.shape[1]:
            return None
        return size, tokens

    def _fields(self, key: tuple[int, int]) -> list[torch.Tensor]:
        size, tokens = key
        T = size * tokens
        buffer = self.buffers[key]
        return [buffer[i * T:(i + 1) * T] for i in range(4)] + \
            [buffer[4 * T + i * size: 4 * T + (i + 1) * size] for i in range(6)]

    def _run(self, key: tuple[int, int]) -> torch.Tensor:
        size, tokens = key
        ids, positions, slots, logits_rows, rows, prefix, lens, starts, seq_lens, mask_starts = self._fields(key)
        meta = AttentionMetadata(
            mode="extend", req_to_token=self.req_to_token, req_pool_indices=rows, prefix_lens=prefix,
            extend_lens=lens, extend_start_loc=starts, seq_lens=seq_lens, out_cache_loc=slots,
            logits_indices=logits_rows, max_extend_len=tokens, max_seq_len=int(self.req_to_token.shape[1]),
            tree_mask=self.masks.get(key), mask_start_loc=mask_starts if self.tree else None)
        self.write_fn(meta)
        return self.model.forward(ids, positions, meta, self.kv_cache)

    def load(self, batch: ForwardBatch, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Upload a verify batch into ``key``'s buffer -> static (input_ids, positions,
        req_pool_indices) views; row b's tokens start at ``b * tokens``."""
        self.uploader.upload_into(pad_verify(batch, *key), self.buffers[key])
        fields = self._fields(key)
        return fields[0], fields[1], fields[4]

    def set_mask(self, key: tuple[int, int], extend_lens: list[int], parents: list[list[int]]) -> None:
        """The rows' tree masks from host parents (trees only; call before ``launch``)."""
        self.masks[key].copy_(verify_mask(extend_lens, parents, *key), non_blocking=False)

    def clear_mask(self, key: tuple[int, int]) -> torch.Tensor:
        """``key``'s static mask reset to the causal triangle on the device (a copy of the
        capture's) -> the mask, for the drafter to draw its trees into (row b's block at
        ``b * tokens^2``, stride ``tokens``) before ``launch``."""
        self.masks[key].copy_(self.causal[key])
        return self.masks[key]


def _idle_verify(size: int, tokens: int) -> list[int]:
    """The buffer a bucket is captured with: every row the dummy row, slot 0."""
    T = size * tokens
    return ([0] * (4 * T) + [0] * size + [0] * size + [tokens] * size + [b * tokens for b in range(size)]
            + [tokens] * size + [b * tokens * tokens for b in range(size)])


# ----------------------------------------------------------------------------- EAGLE head steps
DRAFT_KINDS = ("catch_up", "chain", "tree")


class DraftGraphs:
    """Captured EAGLE / EAGLE3 head steps, one per (batch size, step kind) (module docstring).

    ``drafter`` is the forward stage's ``EagleDrafter``: its ``catch_up_padded``,
    ``chain_steps`` and ``grow_trees`` are the captured bodies."""

    def __init__(self, drafter, req_to_token: torch.Tensor, max_bs: int, tokens: int, depth: int,
                 device: torch.device, uploader, eager: bool = False) -> None:
        self.drafter, self.req_to_token = drafter, req_to_token
        self.model = drafter.head  # what ``capture`` reads kept features of (none)
        self.device, self.uploader, self.eager = device, uploader, eager
        self.tokens, self.depth = tokens, depth  # catch-up q rows per row; chain drafts per row
        self.sizes = capture_sizes(max_bs)
        self.kinds = ("catch_up", "tree" if drafter.topk > 1 else "chain")
        head = drafter.head.config
        self.feature_width = head.target_hidden_size * (3 if head.kind == "eagle3" else 1)
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self.ints: dict[int, torch.Tensor] = {}       # size -> rows, starts, counts, draft counts
        self.ids: dict[int, torch.Tensor] = {}
        self.feature_in: dict[int, torch.Tensor] = {}  # size -> catch-up features [S*tokens, F]
        self.outputs: dict[tuple[int, str], object] = {}
        self.features: dict[tuple[int, str], list[torch.Tensor]] = {}  # ``capture`` fills (a head keeps none)
        self.replays = {kind: 0 for kind in DRAFT_KINDS}
        self.pool = None

    @torch.inference_mode()
    def capture_all(self, pool=None) -> None:
        """Every bucket's step graphs, largest first, into ``pool`` (the target graphs')."""
        self.pool = pool
        dtype = self.drafter.head.dtype
        for size in reversed(self.sizes):
            self.ints[size] = torch.zeros(4 * size, dtype=torch.int64, device=self.device)
            self.ids[size] = torch.zeros(size * self.tokens, dtype=torch.int64, device=self.device)
            self.feature_in[size] = torch.zeros(size * self.tokens, self.feature_width, dtype=dtype, device=self.device)
            if not self.eager:
                for kind in self.kinds:  # the catch-up first: the draft steps read its outputs
                    self.pool = capture(self, (size, kind), self.pool)

    def size_for(self, batch: ForwardBatch, segments: list, drafts: list[list[int]]) -> int | None:
        """The bucket whose graphs draft this batch (``segments``: its catch-up rows), or None."""
        size = next((s for s in self.sizes if s >= len(batch.rids)), None)
        if size is None:
            return None
        reach = min(int(self.req_to_token.shape[1]), int(self.drafter.head.cos_sin_cache.shape[0]))
        if any(s.count > self.tokens or s.start + self.tokens > reach for s in segments):
            return None
        if self.drafter.topk == 1 and drafts and max(len(d) for d in drafts) > self.depth:
            return None
        return size

    def _run(self, key: tuple[int, str]):
        size, kind = key
        rows, starts, counts, drafts = self.ints[size].view(4, size)
        if kind == "catch_up":
            return self.drafter.catch_up_padded(self.ids[size], self.feature_in[size], rows, starts, counts,
                                                self.tokens, self.req_to_token)
        logits, hidden = self.outputs[(size, "catch_up")]
        if kind == "chain":
            return self.drafter.chain_steps(rows, starts + counts, drafts, logits, hidden, self.req_to_token,
                                            self.depth)
        drafting = drafts > 0
        return self.drafter.grow_trees(torch.where(drafting, rows, 0), torch.where(drafting, starts + counts, 0),
                                       logits, hidden, self.req_to_token, int(self.req_to_token.shape[1]))

    def catch_up(self, size: int, segments: list, drafts: list[list[int]]) -> None:
        """Load the catch-up rows (segment of batch row b into graph row b) and run the catch-up."""
        ints = [0] * (4 * size)
        for s in segments:
            ints[s.b], ints[size + s.b], ints[2 * size + s.b] = s.row, s.start, s.count
            ints[3 * size + s.b] = len(drafts[s.b]) if drafts else 0
        index = [s.b * self.tokens + j for s in segments for j in range(s.count)]
        self.uploader.upload_into(ints, self.ints[size])
        at = self.uploader.upload(index, torch.int64)
        self.ids[size][at] = torch.cat([s.tokens for s in segments])
        self.feature_in[size][at] = torch.cat([s.features for s in segments]).to(self.feature_in[size].dtype)
        self.launch((size, "catch_up"))

    def chain(self, size: int) -> torch.Tensor:
        """[size, depth] drafts of the catch-up just run (a row's first draft-count entries)."""
        return self.launch((size, "chain"))

    def tree(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidates' (tokens, parents, scores), each [size, C], of the catch-up just run."""
        return self.launch((size, "tree"))

    def launch(self, key: tuple[int, str]):
        """Replay ``key``'s graph (eager: run its body) -> its static outputs."""
        if self.eager:
            self.outputs[key] = self._run(key)
        else:
            self.graphs[key].replay()
        self.replays[key[1]] += 1
        return self.outputs[key]
