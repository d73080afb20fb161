"""Pure unit tests: VQL literals and the query builder, the error table, pages and JSON records."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from clinical_crm.engine.staging import page_frame
from clinical_crm.vault import Query, QueryPage, errors, vql
from clinical_crm.vault.client import VaultClient, _flatten, _json_ready


@pytest.mark.parametrize(
    "value, literal",
    [
        ("abc", "'abc'"),
        ("O'Brien", r"'O\'Brien'"),
        ("back\\slash", r"'back\\slash'"),
        ("x' OR name__v != '", r"'x\' OR name__v != \''"),
        ("\\'", r"'\\\''"),
        (42, "'42'"),
        (True, "true"),
        (False, "false"),
        (None, "null"),
        (date(2026, 3, 4), "'2026-03-04'"),
        (datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=timezone.utc), "'2026-03-04T05:06:07.891Z'"),
        (datetime(2026, 3, 4, 7, 6, 7, tzinfo=timezone(timedelta(hours=2))), "'2026-03-04T05:06:07.000Z'"),
    ],
)
def test_quote(value, literal):
    assert vql.quote(value) == literal


def test_in_list():
    assert vql.in_list(["a", "b'c"]) == r"('a','b\'c')"
    with pytest.raises(ValueError):
        vql.in_list([])


def test_chunk_values_keeps_each_list_in_room():
    values = [f"V{n:015d}" for n in range(10_000)]
    chunks = list(vql.chunk_values(values, room=5_000))
    assert [v for chunk in chunks for v in chunk] == values
    assert all(len(vql.in_list(chunk)) <= 5_000 for chunk in chunks)
    assert len(chunks) > 1


@pytest.mark.parametrize(
    "error_type, exception",
    [
        ("INVALID_SESSION_ID", errors.VaultAuthenticationError),
        ("USERNAME_OR_PASSWORD_INCORRECT", errors.VaultAuthenticationError),
        ("INSUFFICIENT_ACCESS", errors.VaultPermissionError),
        ("INVALID_DATA", errors.VaultInvalidDataError),
        ("PARAMETER_REQUIRED", errors.VaultInvalidDataError),
        ("OPERATION_NOT_ALLOWED", errors.VaultInvalidDataError),
        ("INVALID_FILTER", errors.VaultQueryError),
        ("INCORRECT_QUERY_SYNTAX_ERROR", errors.VaultQueryError),
        ("API_LIMIT_EXCEEDED", errors.VaultRateLimitError),
        ("EXCEPTION", errors.VaultTransientError),
        ("UNEXPECTED_ERROR", errors.VaultTransientError),
        ("SOMETHING_NEW", errors.VaultError),
    ],
)
def test_error_table(error_type, exception):
    error = errors.error_for(error_type, "why")
    assert type(error) is exception
    assert error.error_type == error_type and error.message == "why"


def test_a_query_is_built_from_its_fields_and_never_parsed_back():
    query = (Query.select("crm_activity__v", ["id", "person__vr.veeva_network_id__c", None, "id", "subject__v"])
             .filter("subject__v = 'a, FROM b'").ordered("modified_date__v").paged(1000))
    assert query.columns == ["id", "person__vr.veeva_network_id__c", "subject__v"]
    assert query.statement == ("SELECT id, person__vr.veeva_network_id__c, subject__v FROM crm_activity__v "
                               "WHERE subject__v = 'a, FROM b' ORDER BY modified_date__v PAGESIZE 1000")
    chunks = list(query.contains("id", [f"V{i:05d}" for i in range(10_000)]))
    assert len(chunks) > 1 and all(len(c.statement) <= vql.VQL_MAX_CHARS for c in chunks)
    assert all(c.columns == query.columns and c.statement.endswith("PAGESIZE 1000") for c in chunks)


def test_pages_flatten_picklists_and_stage_with_their_columns():
    assert _flatten(["phone__v"]) == "phone__v" and _flatten([]) is None and _flatten(["a", "b"]) == ["a", "b"]
    frame = page_frame(QueryPage([{"id": "1", "channel__v": "phone__v", "tags__c": None}],
                                 ["id", "channel__v", "missing__v"]))
    assert list(frame.columns) == ["id", "channel__v", "missing__v", "tags__c"]
    assert frame.loc[0, "channel__v"] == "phone__v" and frame.loc[0, "tags__c"] is None
    empty = page_frame(QueryPage([], ["id", "name__v"]))
    assert list(empty.columns) == ["id", "name__v"] and len(empty) == 0


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_burst_gate_spends_the_window_down_to_the_reserve_then_waits_for_the_next():
    from clinical_crm.vault.pacing import CLOCK_MARGIN_SECONDS, BurstGate

    clock = FakeClock(1000.0 + 30)  # 30 s into the window that starts at 1000 (windows of 100 s)
    gate = BurstGate(reserve=3, window_seconds=100, clock=clock)
    waits = []

    def pause(seconds):
        waits.append(seconds)
        clock.sleep(seconds)

    for remaining in (9, 8, 7, 6, 5, 4):  # what the vault answers
        gate.leave(gate.enter(pause), remaining)
    assert waits == []
    window = gate.enter(pause)  # 4 left, reserve 3: one more call
    assert waits == [] and gate.must_wait()  # 4 - 1 in flight: the reserve
    gate.leave(window, 3)
    assert gate.must_wait()
    gate.enter(pause)  # 3 left = the reserve: wait for the next window (plus the clock margin)
    assert waits == [pytest.approx(70 + CLOCK_MARGIN_SECONDS)] and clock.now == pytest.approx(1101)
    assert BurstGate(reserve=3, window_seconds=2).margin == pytest.approx(0.04)  # a small part of short windows


def test_burst_gate_counts_calls_in_flight_against_the_reserve():
    from clinical_crm.vault.pacing import BurstGate

    clock = FakeClock(50.0)
    gate = BurstGate(reserve=2, window_seconds=100, clock=clock)
    waits = []
    gate.leave(gate.enter(waits.append), 6)  # 6 left
    flying = [gate.enter(waits.append) for _ in range(4)]  # each starts while 6 - in flight > 2
    assert waits == []
    assert gate.must_wait()  # 6 - 4 in flight = the reserve: a fifth call waits
    for w in flying:
        gate.leave(w, 2)
    assert gate.must_wait()


def test_burst_gate_ignores_answers_to_calls_of_an_earlier_window_and_zero_reserve_is_off():
    from clinical_crm.vault.pacing import BurstGate

    clock = FakeClock(99.5)
    gate = BurstGate(reserve=5, window_seconds=100, clock=clock)
    late = gate.enter(lambda s: None)
    clock.now = 150.0
    gate.enter(lambda s: None)
    gate.leave(late, 0)  # sent in the window before: says nothing of this one
    assert not gate.must_wait()
    off = BurstGate(reserve=0, window_seconds=100, clock=clock)
    off.leave(off.enter(lambda s: None), 0)
    assert not off.must_wait()
    with pytest.raises(ValueError):
        BurstGate(reserve=1, window_seconds=0)


def test_burst_gate_never_lets_threads_past_the_limit():
    """Eight threads against a simulated vault of 40 calls per window: no call past the limit."""
    import threading

    from clinical_crm.vault.pacing import BurstGate

    limit, window_seconds = 40, 100.0
    clock = FakeClock(0.0)
    lock = threading.Lock()
    used: dict[int, int] = {}
    over = []
    gate = BurstGate(reserve=8, window_seconds=window_seconds, clock=clock)

    def pause(seconds):
        with lock:
            clock.now = max(clock.now, clock.now + seconds)

    def call():
        window = gate.enter(pause)
        with lock:
            vault_window = int(clock.now // window_seconds)
            used[vault_window] = used.get(vault_window, 0) + 1
            remaining = limit - used[vault_window]
            if remaining < 0:
                over.append(vault_window)
        gate.leave(window, max(remaining, 0))

    threads = [threading.Thread(target=lambda: [call() for _ in range(25)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(used.values()) == 200 and over == []
    assert max(used.values()) <= limit and len(used) >= 200 // limit


def test_batch_size_over_500_is_refused():
    client = VaultClient("http://127.0.0.1:9", "u", "p")
    with pytest.raises(ValueError):
        client.upsert("x__v", [{"a": 1}], id_param="external_id__v", batch_size=501)


def test_records_are_made_json_ready():
    import numpy as np
    import pandas as pd

    record = {
        "a": np.int64(3), "b": float("nan"), "c": pd.NaT, "d": pd.Timestamp("2026-01-02T03:04:05Z"),
        "e": date(2026, 1, 2), "f": None, "g": "text", "h": True, "i": ["x__v"], "j": pd.NA,
    }
    assert _json_ready(record) == {
        "a": 3, "b": None, "c": None, "d": "2026-01-02T03:04:05.000Z", "e": "2026-01-02", "f": None,
        "g": "text", "h": True, "i": ["x__v"], "j": None,
    }
