"""KV bookkeeping of requests: pool + radix cache + rows, in one place.

Every change of who owns which slot goes through this class, so the
integrity check ``free + cached + in use == total`` can hold by construction.

What happens to a request's slots (``L = kv_len``, ``A = L`` cut to whole
pages, ``C = cached_len``; see ``req_table.Req``):

==================  =====================================================
event               slots
==================  =====================================================
admit               ``slots = match_prefix(matchable_ids)``; lock node;
                    the row's first ``C`` entries need a RowWrite
extend (alloc)      append slots for the new tokens (evict LRU leaves first
                    when the pool is short)
after a chunk,      insert ``fill_ids[:A] -> slots[:A]``; the tree may
finish, retract     already hold ``[C, P)``: our copies there are freed and
                    replaced by the tree's (a RowWrite); lock the new node
finish / retract    also free ``slots[A:]`` (the partial last page), unlock,
                    free the row
abort               no insert: free ``slots[C:]``, unlock, free the row
==================  =====================================================
"""
from __future__ import annotations

from pipeline.messages import RowWrite
from stages.schedule.kv_pool import PagePool, extend_slots, pages_needed
from stages.schedule.radix import RadixCache
from stages.schedule.req_table import Req, RowTable


class KVManager:
    """Owns the page pool, the radix tree and the row table of the schedule stage."""

    def __init__(self, num_slots: int, page_size: int, num_rows: int, disable_radix_cache: bool) -> None:
        self.pool = PagePool(num_slots, page_size)
        self.tree = RadixCache(page_size, self.pool.free_slots, disabled=disable_radix_cache)
        self.rows = RowTable(num_rows)
        self.page_size = page_size
        self.holders: dict[str, Req] = {}  # requests holding a row (and maybe slots)

    # ------------------------------------------------------------- capacity
    @property
    def capacity_tokens(self) -> int:
        return self.pool.capacity_tokens

    @property
    def available_tokens(self) -> int:
        """Free now plus what eviction could free."""
        return self.pool.num_free_tokens + self.tree.evictable_size

    def tokens_to_grow(self, req: Req, num_new: int) -> int:
        """Pool tokens (whole pages) a request needs to grow by ``num_new``."""
        return pages_needed(req.kv_len, num_new, self.page_size) * self.page_size

    def tokens_to_grow_from(self, num_held: int, num_new: int) -> int:
        return pages_needed(num_held, num_new, self.page_size) * self.page_size

    def used_tokens(self) -> int:
        return self.capacity_tokens - self.pool.num_free_tokens

    # ---------------------------------------------------------------- admit
    def match(self, req: Req, count: bool = False) -> int:
        """Length of the cached prefix a (waiting) request would get; no side effects but LRU."""
        slots, _ = self.tree.match_prefix(req.matchable_ids, count=count)
        return len(slots)

    def admit(self, req: Req) -> list[RowWrite] | None:
        """Give a waiting request a row and its cached prefix; None if no row is free."""
        row = self.rows.alloc()
        if row is None:
            return None
        slots, node = self.tree.match_prefix(req.matchable_ids, count=not req.admitted_once)
        self.tree.inc_lock_ref(node)
        req.row, req.slots, req.cached_len, req.last_node = row, list(slots), len(slots), node
        self.holders[req.rid] = req
        return [RowWrite(row=row, start=0, slots=list(slots))] if slots else []

    def grow(self, req: Req, num_new: int) -> list[int] | None:
        """Slots for ``num_new`` more tokens of ``req`` (evicting if needed); None if short."""
        need = self.tokens_to_grow(req, num_new)
        if need > self.pool.num_free_tokens:
            self.tree.evict(need - self.pool.num_free_tokens)
        new_slots = extend_slots(self.pool, req.slots, num_new)
        if new_slots is not None:
            req.slots.extend(new_slots)
        return new_slots

    def decode_need(self, reqs: list[Req]) -> int:
        """Pool tokens one more token for each of ``reqs`` takes (a page per full last page)."""
        size = self.page_size
        if size == 1:
            return len(reqs)
        return size * sum(1 for r in reqs if len(r.slots) % size == 0)

    def grow_decodes(self, reqs: list[Req]) -> bool:
        """One more slot for every request (one allocation for all); False, nothing taken, if short."""
        size = self.page_size
        need = self.decode_need(reqs)
        if need > self.pool.num_free_tokens:
            self.tree.evict(need - self.pool.num_free_tokens)
        pages = self.pool.alloc(need // size)
        if pages is None:
            return False
        if size == 1:
            for req, slot in zip(reqs, pages):
                req.slots.append(slot)
            return True
        next_page = iter(pages)
        for req in reqs:
            slots = req.slots
            slots.append(next(next_page) * size if len(slots) % size == 0 else slots[-1] + 1)
        return True

    # --------------------------------------------------------------- caching
    def cache_prefix(self, req: Req, num_kv: int | None = None) -> list[RowWrite]:
        """Insert the request's computed whole pages into the tree; re-lock its deepest node.

        ``num_kv``: tokens computed so far (default all its slots); less when a
        later chunk, planned ahead, holds slots whose KV is still being computed.
        """
        if self.tree.disabled:
            return []
        num_kv = req.kv_len if num_kv is None else num_kv
        aligned = num_kv - num_kv % self.page_size
        if aligned <= req.cached_len:
            return []
        tokens = req.key_ids[:aligned]
        already = self.tree.insert(tokens, req.slots[:aligned])
        writes: list[RowWrite] = []
        if already > req.cached_len:
            # The tree got [cached_len, already) from someone else meanwhile: drop our copy.
            self.pool.free_slots(req.slots[req.cached_len:already])
        tree_slots, node = self.tree.match_prefix(tokens)
        assert len(tree_slots) == aligned, f"inserted {aligned} tokens, matched {len(tree_slots)}"
        if already > req.cached_len:
            writes.append(RowWrite(row=req.row, start=req.cached_len,
                                   slots=tree_slots[req.cached_len:already]))
        req.slots[:aligned] = tree_slots
        self.tree.inc_lock_ref(node)
        self.tree.dec_lock_ref(req.last_node)
        req.last_node, req.cached_len = node, aligned
        return writes

    def trim(self, req: Req, num_tokens: int) -> None:
        """Give back the slots past ``num_tokens`` (never cached ones): a step planned ahead
        for a request that has finished meanwhile. Pages starting past the cut go free."""
        if req.rid not in self.holders or req.kv_len <= num_tokens:
            return
        keep = max(num_tokens, req.cached_len)
        first_free = -(-keep // self.page_size) * self.page_size  # the first page start at or after keep
        if first_free < req.kv_len:
            self.pool.free_slots(req.slots[first_free:])
        del req.slots[keep:]

    def release(self, req: Req, keep_in_cache: bool) -> None:
        """Finish, retract (``keep_in_cache``) or abort: give back the row and owned slots."""
        if req.rid not in self.holders:
            return
        if keep_in_cache:
            self.cache_prefix(req)
        owned = req.slots[req.cached_len:]
        if owned:
            self.pool.free_slots(owned)
        self.tree.dec_lock_ref(req.last_node)
        self.rows.free(req.row)
        del self.holders[req.rid]
        req.slots, req.cached_len, req.last_node, req.row = [], 0, None, 0

    def flush(self) -> int:
        return self.tree.evict_all()

    # ------------------------------------------------------------- integrity
    def check_integrity(self) -> None:
        """free + cached + in use == total, and the tree's counters add up."""
        self.tree.check()
        in_use = sum(r.kv_len - r.cached_len for r in self.holders.values())
        # Requests own whole pages: count their pages, not their tokens.
        size = self.page_size
        owned_pages = sum(-(-(r.kv_len - r.cached_len) // size) for r in self.holders.values())
        total = self.pool.num_free_tokens + self.tree.total_size + owned_pages * size
        assert total == self.capacity_tokens, (
            f"KV leak: free {self.pool.num_free_tokens} + cached {self.tree.total_size} + "
            f"in use {in_use} ({owned_pages} pages) != total {self.capacity_tokens}")
