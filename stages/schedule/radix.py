"""Radix prefix cache: token prefixes whose KV is already in the pool.

A tree whose edges are token runs; each node keeps, for its run, the KV slots
holding those tokens. A new request walks the tree with its prompt
(``match_prefix``) and reuses the slots of the longest cached prefix, so only
the rest is prefilled. Finished requests (and every prefill chunk) ``insert``
their computed tokens, so the next request with the same system prompt, a
retracted request that resumes, or a sibling of an ``n > 1`` request hits.

Pages: with ``page_size > 1`` keys are cut to whole pages and children are
keyed by their first page, so every node holds whole pages and a match is
page-aligned (a request's partial last page never enters the tree).

Ownership of slots (the table that makes the integrity check work):

==========================  ================================================
slots                       owner
==========================  ================================================
in a tree node              the tree; freed only by ``evict`` (or ``reset``)
request, past cached_len    the request; freed on finish/abort/retract
neither                     the page pool's free list
==========================  ================================================

Locks: a running request holds a lock on the deepest node of its cached
prefix (``inc_lock_ref`` locks the whole path to the root); locked nodes are
never evicted. ``evictable_size`` counts tokens in unlocked nodes,
``protected_size`` tokens in locked ones. ``evict`` frees least recently used
unlocked leaves until enough tokens are free.

Disabled (``--disable-radix-cache``): every match is empty and insert stores
nothing (the caller frees the request's slots itself).
"""
from __future__ import annotations

import heapq
import itertools
from typing import Callable


class RadixNode:
    """One edge of the tree: a token run (``key``) and its KV slots (``value``)."""

    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(self, parent: "RadixNode | None", key: list[int], value: list[int], tick: int) -> None:
        self.children: dict[object, RadixNode] = {}
        self.parent = parent
        self.key = key
        self.value = value
        self.lock_ref = 0
        self.last_access = tick

    def __lt__(self, other: "RadixNode") -> bool:
        return self.last_access < other.last_access


class RadixCache:
    """Prefix tree over token ids -> KV slots, with lock refs and LRU eviction."""

    def __init__(self, page_size: int, free_slots: Callable[[list[int]], None], disabled: bool = False) -> None:
        self.page_size = page_size
        self.disabled = disabled
        self._free_slots = free_slots
        self._clock = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Forget every node (slots are NOT freed: call ``evict_all`` for that)."""
        self.root = RadixNode(None, [], [], 0)
        self.root.lock_ref = 1
        self.evictable_size = 0
        self.protected_size = 0
        self.num_match_tokens = 0
        self.num_hit_tokens = 0

    # ------------------------------------------------------------------ keys
    def _child_key(self, key: list[int]) -> object:
        return key[0] if self.page_size == 1 else tuple(key[: self.page_size])

    def _match_len(self, a: list[int], b: list[int]) -> int:
        n = 0
        limit = min(len(a), len(b))
        while n < limit and a[n] == b[n]:
            n += 1
        return n - n % self.page_size

    def _aligned(self, key: list[int]) -> list[int]:
        return key[: len(key) - len(key) % self.page_size]

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    @property
    def hit_rate(self) -> float:
        """Fraction of prompt tokens looked up that were found cached."""
        return self.num_hit_tokens / self.num_match_tokens if self.num_match_tokens else 0.0

    # ----------------------------------------------------------------- match
    def match_prefix(self, key: list[int], count: bool = False) -> tuple[list[int], RadixNode]:
        """Slots of the longest cached (page-aligned) prefix of ``key`` and its last node.

        A node matched only partway is split so the returned node ends exactly
        at the match. ``count`` adds the lookup to the hit-rate statistics.
        """
        if count:
            self.num_match_tokens += len(key)
        if self.disabled:
            return [], self.root
        key = self._aligned(key)
        node, slots = self.root, []
        tick = next(self._clock)
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                break
            matched = self._match_len(child.key, key)
            if matched == 0:
                break
            if matched < len(child.key):
                child = self._split(child, matched)
            child.last_access = tick
            slots.extend(child.value)
            node, key = child, key[matched:]
        if count:
            self.num_hit_tokens += len(slots)
        return slots, node

    def _split(self, child: RadixNode, at: int) -> RadixNode:
        """Cut ``child`` after ``at`` tokens; return the new upper half."""
        upper = RadixNode(child.parent, child.key[:at], child.value[:at], child.last_access)
        upper.lock_ref = child.lock_ref
        upper.children = {self._child_key(child.key[at:]): child}
        child.parent.children[self._child_key(child.key)] = upper
        child.parent = upper
        child.key, child.value = child.key[at:], child.value[at:]
        return upper

    # ---------------------------------------------------------------- insert
    def insert(self, key: list[int], value: list[int]) -> int:
        """Store ``key -> value`` (page-aligned part); return how many leading tokens were already cached.

        The caller owns ``value[:returned]`` duplicates and must free those of
        its slots that differ from the tree's.
        """
        if self.disabled:
            return 0
        key = self._aligned(key)
        value = value[: len(key)]
        node, done = self.root, 0
        tick = next(self._clock)
        while done < len(key):
            rest = key[done:]
            child = node.children.get(self._child_key(rest))
            if child is None:
                leaf = RadixNode(node, rest, value[done:], tick)
                node.children[self._child_key(rest)] = leaf
                self.evictable_size += len(rest)
                return done
            matched = self._match_len(child.key, rest)
            if matched < len(child.key):
                child = self._split(child, matched)
            child.last_access = tick
            node, done = child, done + matched
        return done

    # ----------------------------------------------------------------- locks
    def inc_lock_ref(self, node: RadixNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: RadixNode) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, f"unlock of an unlocked node ({len(node.key)} tokens)"
            if node.lock_ref == 1:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            node.lock_ref -= 1
            node = node.parent

    # ----------------------------------------------------------------- evict
    def evict(self, num_tokens: int) -> int:
        """Free least recently used unlocked leaves until ``num_tokens`` are freed; return freed."""
        if self.disabled or num_tokens <= 0:
            return 0
        leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            self._free_slots(leaf.value)
            freed += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            parent = leaf.parent
            del parent.children[self._child_key(leaf.key)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    def evict_all(self) -> int:
        """Free every unlocked node (FlushCache)."""
        return self.evict(self.evictable_size)

    def _nodes(self) -> list[RadixNode]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is not self.root:
                out.append(node)
        return out

    def check(self) -> None:
        """Sizes add up to the nodes' lengths (tests and idle checks)."""
        nodes = self._nodes()
        total = sum(len(n.key) for n in nodes)
        locked = sum(len(n.key) for n in nodes if n.lock_ref > 0)
        assert total == self.total_size, f"tree holds {total} tokens, counters say {self.total_size}"
        assert locked == self.protected_size, f"locked {locked} != protected_size {self.protected_size}"
        for n in nodes:
            assert len(n.key) == len(n.value) and len(n.key) % self.page_size == 0, "ragged node"
