"""Reads side by side (issue 12): independent reads in parallel within the concurrency, the pages
of one query in order, errors kept, nothing left running."""
from __future__ import annotations

import threading
import time

import pytest

from clinical_crm.engine import extract
from clinical_crm.vault import QueryPage


class PagedVault:
    """`query(q)` yields the pages of q ("name:pages") after a short wait each, noting the calls in flight."""

    def __init__(self, seconds: float = 0.02, fail: str | None = None):
        self.seconds, self.fail = seconds, fail
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.pages: list[tuple[str, int]] = []

    def query(self, q: str):
        name, count = q.split(":")
        for number in range(int(count)):
            with self.lock:
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            time.sleep(self.seconds)
            with self.lock:
                self.in_flight -= 1
                self.pages.append((name, number))
            if name == self.fail and number == 1:
                raise RuntimeError(f"{name} page {number} failed")
            yield QueryPage([{"id": f"{name}-{number}"}], ["id"])


def test_prefetched_keeps_order_and_raises_where_the_source_did():
    assert list(extract.prefetched(iter(range(50)))) == list(range(50))

    def broken():
        yield 1
        raise ValueError("page 2")

    got = []
    with pytest.raises(ValueError, match="page 2"):
        for item in extract.prefetched(broken()):
            got.append(item)
    assert got == [1]


def test_prefetched_stops_its_thread_when_the_caller_stops_early():
    produced = []

    def endless():
        n = 0
        while True:
            produced.append(n)
            yield n
            n += 1

    before = threading.active_count()
    for item in extract.prefetched(endless()):
        if item == 3:
            break
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before and len(produced) <= 6


def test_lookups_run_side_by_side_with_their_pages_in_order():
    vault = PagedVault()
    frames = list(extract.frames_side_by_side(vault, ["a:3", "b:2", "c:1", "d:2", "e:1"], concurrency=3))
    assert [f["id"][0] for f in frames] == ["a-0", "a-1", "a-2", "b-0", "b-1", "c-0", "d-0", "d-1", "e-0"]
    assert vault.most_in_flight == 3
    for name in "abde":  # each query's pages requested in order
        numbers = [n for q, n in vault.pages if q == name]
        assert numbers == sorted(numbers)
    one = PagedVault()
    list(extract.frames_side_by_side(one, ["a:2", "b:2"], concurrency=1))
    assert one.most_in_flight == 1


def test_in_parallel_runs_jobs_within_the_concurrency_and_raises_after_all_ended():
    vault = PagedVault()
    results = extract.in_parallel(2, {name: (lambda n=name: [p.records[0]["id"] for p in vault.query(f"{n}:2")])
                                      for name in "abcd"})
    assert results == {n: [f"{n}-0", f"{n}-1"] for n in "abcd"} and vault.most_in_flight == 2
    failing = PagedVault(fail="b")
    with pytest.raises(RuntimeError, match="b page 1"):
        extract.in_parallel(4, {n: (lambda n=n: list(failing.query(f"{n}:3"))) for n in "abc"})
    assert {(q, n) for q, n in failing.pages} >= {("a", 2), ("c", 2)}  # the others ran to their end
