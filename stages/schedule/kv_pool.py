"""Which KV slots are free: a page allocator over the forward stage's KV pool.

The KV tensors live in the forward stage (``models.batch.KVCache``); this file
only does the bookkeeping of *which* slots hold nothing. A slot is one token's
K/V in every layer. Slots are grouped in pages of ``page_size`` consecutive
slots; the allocator hands out whole pages, and a request fills its last page
before it takes a new one, so its slots are ``page_size``-contiguous runs.

Page 0 (slots ``0 .. page_size-1``) is never handed out: padded rows of a
CUDA-graph batch write their garbage K/V to slot 0.

Invariants
----------
* ``num_free_pages + pages held by requests + pages held by the radix cache ==
  num_pages - 1`` (checked by the schedule stage's integrity check);
* a page is never freed twice (``free`` asserts with the page number).

Running out of pages is not an error: ``alloc`` returns None and the scheduler
evicts cached prefixes, waits, or retracts a request.
"""
from __future__ import annotations


class PagePool:
    """Free-list allocator of KV pages; sizes in tokens are ``pages * page_size``."""

    def __init__(self, num_slots: int, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_slots < 2 * page_size:
            raise ValueError(f"num_slots={num_slots} leaves no page after the reserved page 0")
        self.page_size = page_size
        self.num_pages = num_slots // page_size
        # Pop from the end: low pages first, which keeps tests readable.
        self._free: list[int] = list(range(self.num_pages - 1, 0, -1))
        self._is_free = bytearray(self.num_pages)
        for page in self._free:
            self._is_free[page] = 1

    @property
    def capacity_tokens(self) -> int:
        """Slots a request may ever use (page 0 excluded)."""
        return (self.num_pages - 1) * self.page_size

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_free_tokens(self) -> int:
        return len(self._free) * self.page_size

    def alloc(self, num_pages: int) -> list[int] | None:
        """Take ``num_pages`` pages, or None (nothing taken) when too few are free."""
        if num_pages > len(self._free):
            return None
        if num_pages == 0:
            return []
        pages = self._free[-num_pages:]
        del self._free[-num_pages:]
        for page in pages:
            self._is_free[page] = 0
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            assert 0 < page < self.num_pages and not self._is_free[page], f"double free of page {page}"
            self._is_free[page] = 1
        self._free.extend(pages)

    def free_slots(self, slots: list[int]) -> None:
        """Free the pages of a page-aligned run of slots (every page starts in ``slots``)."""
        size = self.page_size
        if size == 1:
            self.free(slots)
            return
        self.free([slot // size for slot in slots[::size]])

    def slots_of(self, pages: list[int]) -> list[int]:
        size = self.page_size
        if size == 1:
            return pages
        return [page * size + i for page in pages for i in range(size)]


def pages_needed(num_held: int, num_new: int, page_size: int) -> int:
    """New pages a request holding ``num_held`` slots needs to grow by ``num_new``."""
    room = (-num_held) % page_size
    return max(0, -(-(num_new - room) // page_size))


def extend_slots(pool: PagePool, held: list[int], num_new: int) -> list[int] | None:
    """Slots for ``num_new`` more tokens: the rest of the last page, then new pages.

    Returns the new slots (``held`` is not modified) or None when the pool is short.
    """
    size = pool.page_size
    room = (-len(held)) % size
    take = min(room, num_new)
    new_slots = [held[-1] + 1 + i for i in range(take)] if take else []
    pages = pool.alloc(pages_needed(len(held), num_new, size))
    if pages is None:
        return None
    new_slots.extend(pool.slots_of(pages)[: num_new - take])
    return new_slots
