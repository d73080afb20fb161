"""Unit tests of the VQL grammar and its compilation to SQL (no server)."""
from __future__ import annotations

import pytest

from vault_sandbox.db import Store
from vault_sandbox.models import load_model
from vault_sandbox.vql import NULL, Between, BoolOp, Comparison, Contains, VqlError, compile_query, parse


def test_full_statement():
    q = parse("select id, person__vr.veeva_network_id__c FROM crm_activity__v "
              "WHERE (channel__v = 'phone__v' OR complete__v = true) AND activity_date__v BETWEEN '2026-01-01' "
              "AND '2026-12-31' AND subject__v CONTAINS ('a', 'b') ORDER BY modified_date__v DESC, id ASC "
              "PAGESIZE 50 PAGEOFFSET 100")
    assert [f.text for f in q.fields] == ["id", "person__vr.veeva_network_id__c"]
    assert q.object_name == "crm_activity__v"
    assert isinstance(q.where, BoolOp) and q.where.op == "and"
    either, between, contains = q.where.parts
    assert isinstance(either, BoolOp) and either.op == "or"
    assert either.parts[1] == Comparison(either.parts[1].field, "=", True)
    assert isinstance(between, Between) and (between.low, between.high) == ("2026-01-01", "2026-12-31")
    assert isinstance(contains, Contains) and contains.values == ["a", "b"]
    assert [(f.text, desc) for f, desc in q.order] == [("modified_date__v", True), ("id", False)]
    assert (q.pagesize, q.pageoffset) == (50, 100)


@pytest.mark.parametrize("op", ["=", "!=", "<", "<=", ">", ">="])
def test_operators(op):
    q = parse(f"SELECT id FROM study__v WHERE name__v {op} 'x'")
    assert q.where.op == op


def test_null_and_escapes():
    q = parse(r"SELECT id FROM person__sys WHERE email__sys = null OR last_name__sys = 'O\'Brien \\ x'")
    assert q.where.parts[0].value is NULL
    assert q.where.parts[1].value == "O'Brien \\ x"


def test_keywords_inside_names_stay_names():
    q = parse("SELECT from__v, order_x FROM crm_activity__v WHERE and_or = 1 ORDER BY order_x")
    assert [f.text for f in q.fields] == ["from__v", "order_x"]
    assert q.where.field.text == "and_or" and q.where.value == 1


@pytest.mark.parametrize("text, fragment", [
    ("SELECT id FROM", "expected a field or object name"),
    ("SELECT id FROM study__v WHERE name__v = ", "end of query"),
    ("SELECT id FROM study__v WHERE name__v ~ 'x'", "column 39"),
    ("SELECT id FROM study__v WHERE name__v = 'unterminated", "column"),
    ("SELECT id FROM study__v ORDER name__v", "expected"),
])
def test_syntax_errors_say_where_and_what(text, fragment):
    with pytest.raises(VqlError) as err:
        parse(text)
    assert err.value.error_type == "INCORRECT_QUERY_SYNTAX_ERROR"
    assert fragment in err.value.message


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(load_model("ctms"), str(tmp_path_factory.mktemp("vql") / "ctms.db"))


def test_compiles_to_parametrised_sql_with_left_joins(store):
    compiled = compile_query(parse(
        "SELECT id, person__vr.veeva_network_id__c FROM crm_activity__v "
        r"WHERE created_by__vr.email__sys = 'x\'; DROP TABLE person__sys; --' "
        "AND object_type__vr.api_name__v = 'clinical_activity__v' ORDER BY modified_date__v"), store)
    sql = str(compiled.statement().compile(store.engine))
    assert "LEFT OUTER JOIN person__sys" in sql and "LEFT OUTER JOIN user__sys" in sql
    assert "LEFT OUTER JOIN _object_types" in sql
    assert "DROP TABLE" not in sql                     # the value is a bound parameter
    params = compiled.statement().compile(store.engine).params
    assert any("DROP TABLE" in str(v) for v in params.values())
    # id is always the final tiebreak of the order.
    assert [c.name for c, _ in compiled.order] == ["modified_date__v", "id"]


@pytest.mark.parametrize("text, error_type, fragment", [
    ("SELECT nope__v FROM study__v", "INCORRECT_QUERY_SYNTAX_ERROR", "nope__v"),
    ("SELECT id FROM study__v WHERE nope__v = 'x'", "INVALID_FILTER",
     "'nope__v' on object 'study__v' in WHERE (column 31)"),
    ("SELECT id FROM crm_activity__v WHERE person__vr.nope__c = 'x'", "INVALID_FILTER", "nope__c"),
    ("SELECT id FROM crm_activity__v WHERE complete__v = 'yes'", "INVALID_FILTER", "boolean"),
    ("SELECT id FROM crm_activity__v WHERE modified_date__v > 'yesterday'", "INVALID_FILTER", "datetime"),
    ("SELECT id FROM crm_activity__v WHERE channel__v > null", "INVALID_FILTER", "null"),
    ("SELECT id FROM nothing__v", "INCORRECT_QUERY_SYNTAX_ERROR", "nothing__v"),
])
def test_model_errors(store, text, error_type, fragment):
    with pytest.raises(VqlError) as err:
        compile_query(parse(text), store)
    assert err.value.error_type == error_type
    assert fragment in err.value.message


def test_datetime_literals_are_normalised(store):
    compiled = compile_query(parse(
        "SELECT id FROM crm_activity__v WHERE modified_date__v >= '2026-11-25T10:00:00Z'"), store)
    assert "2026-11-25T10:00:00.000Z" in compiled.statement().compile(store.engine).params.values()


def test_keyset_pages_seek_instead_of_scanning_from_the_window_start(tmp_path):
    """A page deep into a windowed query costs about what the first does (SQLite VM steps, not
    time): the keyset bound must lead the WHERE, or SQLite seeks on the window's own lower bound
    and steps over every row already served."""
    from datetime import datetime

    from sqlalchemy import select

    from vault_sandbox.app import Options, Sandbox
    from vault_sandbox.records import Caller
    from support import sqlite_steps
    from vault_sandbox.seed import scale_window, seed_scale

    now = datetime.fromisoformat("2026-11-25T12:00:00+00:00")
    sandbox = Sandbox("ctms", str(tmp_path / "ctms.db"), Options())
    seed_scale(sandbox.store, 12000, now=now)
    start, end = scale_window(now)
    steps = sqlite_steps(sandbox.store.engine)
    users = sandbox.store.table("user__sys")
    with sandbox.store.engine.connect() as conn:
        caller = Caller(conn.execute(select(users.c.id)).scalar(), "integration_user__c")
    first = sandbox.query(f"SELECT id, person__vr.first_name__sys FROM crm_activity__v "
                          f"WHERE modified_date__v >= '{start:%Y-%m-%dT%H:%M:%SZ}' "
                          f"AND modified_date__v <= '{end:%Y-%m-%dT%H:%M:%SZ}' ORDER BY modified_date__v",
                          caller, "v25.2")
    assert first["responseDetails"]["total"] == 12000
    query_id = first["responseDetails"]["next_page"].split("/query/")[1].split("?")[0]
    cost = []
    for offset in range(1000, 12000, 1000):
        steps[0] = 0
        assert len(sandbox.page(query_id, offset, 1000)["data"]) == 1000
        cost.append(steps[0])
    assert sandbox.paging["keyset"] == 11
    assert cost[-1] < 2 * cost[0], cost
