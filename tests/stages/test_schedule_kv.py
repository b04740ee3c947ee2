"""Page pool, radix cache and KV manager on their own: allocation, matching, locks, eviction."""
from __future__ import annotations

import random

import pytest

from stages.schedule.kv_manager import KVManager
from stages.schedule.kv_pool import PagePool, extend_slots
from stages.schedule.radix import RadixCache
from stages.schedule.req_table import Req, RowTable
from pipeline.messages import SamplingParams


def _req(rid: str, ids: list[int]) -> Req:
    return Req(rid=rid, parent_rid=rid, index=0, input_ids=ids, sampling=SamplingParams(),
               max_new_tokens=8, seed=0, arrival_order=0)


def test_page_pool_reserves_page_zero_and_fills_last_page_first() -> None:
    pool = PagePool(num_slots=64, page_size=16)
    assert pool.capacity_tokens == 48 and pool.num_free_pages == 3
    slots = extend_slots(pool, [], 5)
    assert slots == [16, 17, 18, 19, 20]
    more = extend_slots(pool, slots, 13)
    assert more[:11] == list(range(21, 32)) and more[11] // 16 not in (0, 1)
    assert pool.num_free_pages == 1
    assert extend_slots(pool, slots + more, 40) is None and pool.num_free_pages == 1
    pool.free_slots(slots + more)
    assert pool.num_free_pages == 3
    with pytest.raises(AssertionError):
        pool.free([1])
    with pytest.raises(ValueError):
        PagePool(num_slots=16, page_size=16)


def test_row_table_reserves_row_zero() -> None:
    rows = RowTable(3)
    assert {rows.alloc(), rows.alloc()} == {1, 2} and rows.alloc() is None
    rows.free(2)
    with pytest.raises(AssertionError):
        rows.free(2)


@pytest.mark.parametrize("page_size", [1, 4])
def test_radix_match_insert_split_lock_evict(page_size: int) -> None:
    freed: list[int] = []
    tree = RadixCache(page_size, freed.extend)
    key = list(range(100, 112))
    tree.insert(key, list(range(1, 13)))
    slots, node = tree.match_prefix(key[:6] + [0, 0])
    assert slots == list(range(1, 7 - 6 % page_size if page_size > 1 else 7))[: 6 - 6 % page_size]
    tree.check()
    already = tree.insert(key[:8] + [7, 7, 7, 7], list(range(20, 32)))
    assert already == 8
    tree.check()
    assert tree.total_size == 16 and tree.evictable_size == 16
    slots, node = tree.match_prefix(key)
    tree.inc_lock_ref(node)
    assert tree.protected_size == 12 and tree.evictable_size == 4
    assert tree.evict(100) == 4 and sorted(freed) == [28, 29, 30, 31]
    tree.check()
    tree.dec_lock_ref(node)
    assert tree.evict_all() == 12 and tree.total_size == 0


def test_radix_disabled_matches_nothing() -> None:
    tree = RadixCache(1, lambda s: None, disabled=True)
    assert tree.insert([1, 2, 3], [4, 5, 6]) == 0
    assert tree.match_prefix([1, 2, 3]) == ([], tree.root)


@pytest.mark.parametrize("page_size", [1, 16])
def test_kv_manager_random_lifecycles_keep_integrity(page_size: int) -> None:
    rng = random.Random(page_size)
    kv = KVManager(num_slots=2048, page_size=page_size, num_rows=9, disable_radix_cache=False)
    free_before = kv.pool.num_free_tokens
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 40))] for _ in range(4)]
    live: list[Req] = []
    for step in range(300):
        if live and (rng.random() < 0.4 or kv.rows.num_free == 0):
            req = live.pop(rng.randrange(len(live)))
            kv.release(req, keep_in_cache=rng.random() < 0.7)
        else:
            ids = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 30))]
            req = _req(f"r{step}", ids)
            if kv.admit(req) is None:
                continue
            if kv.grow(req, len(ids) - req.kv_len) is None:
                kv.release(req, keep_in_cache=False)
                continue
            req.prefill_target = len(ids)
            for _ in range(rng.randrange(0, 20)):
                req.output_ids.append(rng.randrange(50))
                if kv.grow(req, 1) is None:
                    break
            kv.cache_prefix(req)
            live.append(req)
        kv.check_integrity()
    for req in live:
        kv.release(req, keep_in_cache=True)
    kv.check_integrity()
    assert kv.tree.protected_size == 0
    assert kv.pool.num_free_tokens + kv.tree.evictable_size == free_before
    kv.flush()
    assert kv.pool.num_free_tokens == free_before
