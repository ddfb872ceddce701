"""The sorted-table kernels (_core/table.pyx) against their pure-Python references (tableref.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgbackup._core import table, tableref


def _rows(draw, n_max: int, stride: int) -> np.ndarray:
    """Rows with few distinct ids and prefixes, so equal ids, equal buckets and ties are common."""
    n = draw(st.integers(0, n_max))
    ids = draw(st.lists(st.sampled_from(range(6)), min_size=n, max_size=n))
    tails = draw(st.lists(st.binary(min_size=stride - 32, max_size=stride - 32), min_size=n, max_size=n))
    rows = np.zeros((n, stride), np.uint8)
    for i, (k, tail) in enumerate(zip(ids, tails, strict=True)):
        rows[i, 0] = k % 3           # same first bytes for different ids: shared buckets
        rows[i, 31] = k
        rows[i, 32:] = np.frombuffer(tail, np.uint8)
    return rows


@st.composite
def tables(draw, n_max: int = 60):
    return _rows(draw, n_max, draw(st.sampled_from([32, 48, 64])))


@settings(max_examples=300, deadline=None)
@given(tables())
def test_sort_matches_reference(rows: np.ndarray) -> None:
    native, ref = rows.copy(), rows.copy()
    table.table_sort(native)
    tableref.table_sort(ref)
    assert np.array_equal(native, ref)


@settings(max_examples=200, deadline=None)
@given(tables())
def test_partition_groups_by_first_byte_like_the_reference(rows: np.ndarray) -> None:
    native, ref = rows.copy(), rows.copy()
    starts = table.table_partition(native)
    assert np.array_equal(starts, tableref.table_partition(ref))
    for b in range(256):
        group = native[starts[b] : starts[b + 1]]
        assert (group[:, 0] == b).all()
        assert sorted(map(bytes, group)) == sorted(map(bytes, ref[starts[b] : starts[b + 1]]))


def test_sort_of_a_large_random_table_matches_numpy() -> None:
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 256, (200_000, 48), np.uint8)
    rows[:, 44:48] = 0                                   # no delta flags: equal ids do not occur anyway
    native = rows.copy()
    table.table_sort(native)
    order = np.lexsort([rows[:, i] for i in range(31, -1, -1)])
    assert np.array_equal(native[:, :32], rows[order, :32])
    assert np.array_equal(np.sort(native.view("V48").ravel()), np.sort(rows.view("V48").ravel()))


def test_a_whole_copy_sorts_before_a_delta_then_by_pack_and_offset() -> None:
    rows = np.zeros((4, 48), np.uint8)
    rows[:, :32] = 7
    rows[0, 44:48] = np.frombuffer((1 << 31 | 100).to_bytes(4, "little"), np.uint8)   # delta, pack 0
    rows[1, 32:36] = 2                                                               # whole, pack 2
    rows[2, 32:36] = 1                                                               # whole, pack 1, offset 9
    rows[2, 36] = 9
    rows[3, 32:36] = 1                                                               # whole, pack 1, offset 3
    rows[3, 36] = 3
    table.table_sort(rows)
    assert [(int(r[32]), int(r[36]), int(r[47]) >> 7) for r in rows] == [(1, 3, 0), (1, 9, 0), (2, 0, 0), (0, 0, 1)]


@settings(max_examples=200, deadline=None)
@given(tables(), st.lists(st.sampled_from(range(8)), max_size=12), st.data())
def test_directory_and_lookup_match_reference(rows: np.ndarray, wanted: list[int], data) -> None:
    table.table_sort(rows)
    bits = data.draw(st.sampled_from([1, 2, 12, table.directory_bits(len(rows))]))
    directory = table.table_directory(rows, bits)
    assert np.array_equal(directory, tableref.table_directory(rows, bits))
    ids = np.zeros((len(wanted), 32), np.uint8)
    for i, k in enumerate(wanted):
        ids[i, 0], ids[i, 31] = k % 3, k
    got = table.table_lookup(rows, directory, ids)
    assert np.array_equal(got, tableref.table_lookup(rows, directory, ids))
    for i, pos in enumerate(got):
        if pos >= 0:
            assert rows[pos, :32].tobytes() == ids[i].tobytes()


@settings(max_examples=200, deadline=None)
@given(tables())
def test_dedup_matches_reference(rows: np.ndarray) -> None:
    table.table_sort(rows)
    native, ref = rows.copy(), rows.copy()
    n1, spare1 = table.table_dedup(native)
    n2, spare2 = tableref.table_dedup(ref)
    assert n1 == n2 and np.array_equal(native[:n1], ref[:n2]) and np.array_equal(spare1, spare2)
    assert len({r[:32].tobytes() for r in native[:n1]}) == n1


@settings(max_examples=200, deadline=None)
@given(tables(), st.data())
def test_compact_matches_reference(rows: np.ndarray, data) -> None:
    keep = np.array(data.draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows))), np.uint8)
    native, ref = rows.copy(), rows.copy()
    n1, n2 = table.table_compact(native, keep), tableref.table_compact(ref, keep)
    assert n1 == n2 and np.array_equal(native[:n1], ref[:n2])


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_merge_matches_reference(data) -> None:
    stride = data.draw(st.sampled_from([32, 48]))
    a, b = _rows(data.draw, 40, stride), _rows(data.draw, 20, stride)
    table.table_sort(a)
    table.table_sort(b)
    room = np.zeros((len(a) + len(b) + 3, stride), np.uint8)
    room[: len(a)] = a
    ref = room.copy()
    assert table.table_merge(room, len(a), b) == tableref.table_merge(ref, len(a), b) == len(a) + len(b)
    assert np.array_equal(room, ref)
    whole = np.concatenate([a, b])
    table.table_sort(whole)
    assert np.array_equal(room[: len(whole)], whole)


@settings(max_examples=200, deadline=None)
@given(tables(), st.integers(0, 5), st.integers(0, 2**32 - 1))
def test_scatter_into_buckets_matches_reference(rows: np.ndarray, capacity: int, pack_offset: int) -> None:
    """Small capacities make buckets overflow: those rows must spill, in order, offset like the rest."""
    outs = [np.zeros((256 * capacity + 2, rows.shape[1]), np.uint8) for _ in range(2)]
    fills = [np.zeros(256, np.int64) for _ in range(2)]
    spills = [np.zeros((len(rows) + 1, rows.shape[1]), np.uint8) for _ in range(2)]
    got = table.table_scatter(rows, outs[0], fills[0], capacity, pack_offset, spills[0])
    want = tableref.table_scatter(rows, outs[1], fills[1], capacity, pack_offset, spills[1])
    assert got == want and np.array_equal(fills[0], fills[1])
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(spills[0], spills[1])
    assert int(fills[0].sum()) + got == len(rows)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([32, 48, 64]), st.integers(0, 400), st.data())
def test_closing_the_buckets_matches_reference(stride: int, capacity: int, data) -> None:
    """Capacities of up to 400 rows span many pages, so the pages given back are real ones: the rows
    that stay must be exactly the reference's."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    rows = rng.integers(0, 256, (256 * capacity, stride), np.uint8)
    fill = rng.integers(0, capacity + 1, 256).astype(np.int64)
    if data.draw(st.booleans()):
        fill[rng.integers(0, 256, 200)] = 0                 # many empty buckets
    native, ref = rows.copy(), rows.copy()
    used = table.table_close_buckets(native, fill, capacity)
    assert used == tableref.table_close_buckets(ref, fill, capacity) == int(fill.sum())
    assert np.array_equal(native[:used], ref[:used])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        table.table_sort(np.zeros((3, 16), np.uint8))
    with pytest.raises(ValueError):      # no room for 256 buckets of 2 rows
        table.table_scatter(np.zeros((3, 48), np.uint8), np.zeros((511, 48), np.uint8), np.zeros(256, np.int64),
                            2, 0, np.zeros((3, 48), np.uint8))
    rows = np.zeros((3, 48), np.uint8)
    with pytest.raises(ValueError):
        table.table_lookup(rows, np.zeros(10, np.uint32), np.zeros((1, 32), np.uint8))
    with pytest.raises(ValueError):      # a directory of another table
        table.table_lookup(rows, table.table_directory(np.zeros((5, 48), np.uint8), 4), np.zeros((1, 32), np.uint8))
    with pytest.raises(ValueError):
        table.table_compact(rows, np.zeros(2, np.uint8))
    with pytest.raises(ValueError):
        table.table_merge(rows, 3, np.zeros((1, 48), np.uint8))
    empty = np.zeros((0, 48), np.uint8)
    assert table.table_lookup(empty, table.table_directory(empty, 12), np.zeros((2, 32), np.uint8)).tolist() == [-1, -1]
