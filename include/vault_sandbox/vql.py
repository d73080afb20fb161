"""VQL: parse with the lark grammar in vql.lark, check against the object model, compile to SQL.

Values always travel as bound parameters. Relationship fields one level deep
(``person__vr.veeva_network_id__c``) become LEFT OUTER JOINs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lark import Lark, Transformer, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from sqlalchemy import and_, literal, or_, select
from sqlalchemy.sql import ColumnElement

from vault_sandbox.db import OBJECT_TYPES, Store
from vault_sandbox.models import FieldDef, ObjectDef, VaultModel

_PARSER = Lark((Path(__file__).parent / "vql.lark").read_text(), parser="lalr", lexer="contextual",
               propagate_positions=True)

NULL = object()


class VqlError(Exception):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


@dataclass
class FieldRef:
    path: tuple[str, ...]          # ("name__v",) or ("person__vr", "email__sys")
    column: int | None = field(default=None, compare=False)   # where it starts in the query text

    @property
    def text(self) -> str:
        return ".".join(self.path)


@dataclass
class Comparison:
    field: FieldRef
    op: str
    value: Any


@dataclass
class Between:
    field: FieldRef
    low: Any
    high: Any


@dataclass
class Contains:
    field: FieldRef
    values: list[Any]


@dataclass
class BoolOp:
    op: str                        # "and" | "or"
    parts: list[Any]


@dataclass
class Query:
    fields: list[FieldRef]
    object_name: str
    where: Any = None
    order: list[tuple[FieldRef, bool]] = field(default_factory=list)   # (field, descending)
    pagesize: int | None = None
    pageoffset: int | None = None


class _ToAst(Transformer):
    def start(self, items):
        fields, object_name, *rest = items
        query = Query(fields=fields, object_name=str(object_name))
        for item in rest:
            kind, value = item
            if kind == "where":
                query.where = value
            elif kind == "order":
                query.order = value
            else:
                setattr(query, kind, value)
        return query

    def select_list(self, items):
        return list(items)

    def where_clause(self, items):
        return ("where", items[0])

    def order_clause(self, items):
        return ("order", list(items))

    def order_item(self, items):
        descending = len(items) > 1 and str(items[1]).lower() == "desc"
        return (items[0], descending)

    def pagesize(self, items):
        return ("pagesize", int(items[1]))

    def pageoffset(self, items):
        return ("pageoffset", int(items[1]))

    def disjunction(self, items):
        return BoolOp("or", list(items))

    def conjunction(self, items):
        return BoolOp("and", list(items))

    def comparison(self, items):
        return Comparison(items[0], str(items[1]), items[2])

    def between(self, items):
        return Between(*items)

    def contains(self, items):
        return Contains(items[0], list(items[1:]))

    def field(self, items):
        return FieldRef(tuple(str(t).lower() for t in items), getattr(items[0], "column", None))

    def string(self, items):
        return re.sub(r"\\(.)", r"\1", str(items[0])[1:-1], flags=re.S)

    def number(self, items):
        text = str(items[0])
        return float(text) if "." in text else int(text)

    def true(self, _):
        return True

    def false(self, _):
        return False

    def null(self, _):
        return NULL


_TOKEN_WORDS = {"NAME": "a field or object name", "STRING": "a quoted string", "NUMBER": "a number",
                "INT": "an integer", "OPERATOR": "an operator (= != < <= > >=)", "COMMA": "','",
                "LPAR": "'('", "RPAR": "')'", "DOT": "'.'", "DIRECTION": "ASC or DESC"}


def _expected(tokens) -> str:
    words = sorted({_TOKEN_WORDS.get(t, t.strip("_").replace("__ANON", "keyword")) for t in tokens})
    return ", ".join(words)


def parse(text: str) -> Query:
    """Parse VQL text; raise VqlError(INCORRECT_QUERY_SYNTAX_ERROR) with position and expectation."""
    try:
        return _ToAst().transform(_PARSER.parse(text))
    except UnexpectedEOF as exc:
        raise VqlError("INCORRECT_QUERY_SYNTAX_ERROR",
                       f"Unexpected end of query; expected {_expected(exc.expected)}") from None
    except UnexpectedToken as exc:
        got = "end of query" if exc.token.type == "$END" else repr(str(exc.token))
        raise VqlError("INCORRECT_QUERY_SYNTAX_ERROR",
                       f"Error in query at line {exc.line}, column {exc.column}: unexpected {got}; "
                       f"expected {_expected(exc.expected)}") from None
    except UnexpectedCharacters as exc:
        raise VqlError("INCORRECT_QUERY_SYNTAX_ERROR",
                       f"Error in query at line {exc.line}, column {exc.column}: unexpected character "
                       f"{text[exc.pos_in_stream]!r}; expected {_expected(exc.allowed)}") from None
    except UnexpectedInput as exc:  # pragma: no cover - other lark input errors
        raise VqlError("INCORRECT_QUERY_SYNTAX_ERROR", f"Error in query: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Compilation against the model


@dataclass
class Selected:
    key: str                       # the name in the response ("person__vr.email__sys")
    column: ColumnElement
    field: FieldDef


@dataclass
class Compiled:
    object_name: str
    unfiltered: Any                # SELECT ... FROM ... LEFT JOIN ... (no WHERE / ORDER BY / LIMIT)
    conditions: list               # the WHERE terms, ANDed
    selected: list[Selected]
    order: list[tuple[ColumnElement, bool]]   # sort columns incl. the id tiebreak
    count_unfiltered: Any          # SELECT id FROM ... LEFT JOIN ... (for the total)
    pagesize: int | None
    pageoffset: int | None

    def statement(self, *leading: ColumnElement) -> Any:
        """The query with its WHERE; `leading` terms go first, because SQLite seeks its index on
        the first range it finds on a column (a keyset bound after the window's own lower bound
        would make every page scan from the window's start)."""
        return self.unfiltered.where(*leading, *self.conditions)

    def count_statement(self) -> Any:
        return self.count_unfiltered.where(*self.conditions)


OBJECT_TYPE_FIELDS = {
    "id": FieldDef("id", "id"),
    "api_name__v": FieldDef("api_name__v", "text"),
    "label__v": FieldDef("label__v", "text"),
}


class _Compiler:
    def __init__(self, store: Store, obj: ObjectDef):
        self.store = store
        self.model: VaultModel = store.model
        self.obj = obj
        self.base = store.table(obj.name)
        self.joins: dict[str, Any] = {}          # relationship name -> (alias, onclause)

    def resolve(self, ref: FieldRef, clause: str) -> tuple[ColumnElement, FieldDef]:
        if ref.column is not None:
            clause = f"{clause} (column {ref.column})"
        if len(ref.path) == 1:
            f = self.obj.fields.get(ref.path[0])
            if f is None:
                raise VqlError("INVALID_FILTER" if clause.startswith("WHERE") else "INCORRECT_QUERY_SYNTAX_ERROR",
                               f"Unknown field '{ref.text}' on object '{self.obj.name}' in {clause}")
            return self.base.c[f.name], f
        rel, target_field = ref.path
        f = self.obj.by_relationship(rel)
        if f is None:
            raise VqlError("INVALID_FILTER" if clause.startswith("WHERE") else "INCORRECT_QUERY_SYNTAX_ERROR",
                           f"Unknown relationship '{rel}' on object '{self.obj.name}' in {clause}")
        if f.object == "object_type__v":
            target_fields = OBJECT_TYPE_FIELDS
            target_table = self.store.table(OBJECT_TYPES)
        else:
            target_fields = self.model.objects[f.object].fields
            target_table = self.store.table(f.object)
        tf = target_fields.get(target_field)
        if tf is None:
            raise VqlError("INVALID_FILTER" if clause.startswith("WHERE") else "INCORRECT_QUERY_SYNTAX_ERROR",
                           f"Unknown field '{target_field}' on relationship '{rel}' in {clause}")
        if rel not in self.joins:
            alias = target_table.alias(f"r_{rel}")
            self.joins[rel] = (alias, self.base.c[f.name] == alias.c.id)
        alias = self.joins[rel][0]
        return alias.c[tf.name], tf

    def value(self, f: FieldDef, value: Any, ref: FieldRef) -> Any:
        if value is NULL:
            return NULL
        if f.type == "boolean":
            if not isinstance(value, bool):
                raise VqlError("INVALID_FILTER", f"Field '{ref.text}' is a boolean: compare it to true or false")
            return value
        if f.type == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise VqlError("INVALID_FILTER", f"Field '{ref.text}' is a number")
            return value
        if isinstance(value, bool):
            raise VqlError("INVALID_FILTER", f"Field '{ref.text}' is not a boolean")
        text = str(value)
        if f.type == "datetime":
            return normalise_datetime(text, ref)
        if f.type == "date" and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise VqlError("INVALID_FILTER", f"Field '{ref.text}' is a date: use 'YYYY-MM-DD', not {text!r}")
        return text

    def condition(self, node) -> ColumnElement:
        if isinstance(node, BoolOp):
            parts = [self.condition(p) for p in node.parts]
            return and_(*parts) if node.op == "and" else or_(*parts)
        column, f = self.resolve(node.field, "WHERE")
        if isinstance(node, Comparison):
            value = self.value(f, node.value, node.field)
            if value is NULL:
                if node.op == "=":
                    return column.is_(None)
                if node.op == "!=":
                    return column.is_not(None)
                raise VqlError("INVALID_FILTER", f"Only = and != compare with null ('{node.field.text}')")
            ops = {"=": column.__eq__, "!=": column.__ne__, "<": column.__lt__, "<=": column.__le__,
                   ">": column.__gt__, ">=": column.__ge__}
            expr = ops[node.op](value)
            if node.op == "!=":
                # VQL's != also keeps rows where the field is empty.
                expr = or_(expr, column.is_(None))
            return expr
        if isinstance(node, Between):
            low, high = self.value(f, node.low, node.field), self.value(f, node.high, node.field)
            if low is NULL or high is NULL:
                raise VqlError("INVALID_FILTER", f"BETWEEN needs two values ('{node.field.text}')")
            return column.between(low, high)
        values = [self.value(f, v, node.field) for v in node.values]
        if any(v is NULL for v in values):
            raise VqlError("INVALID_FILTER", f"CONTAINS does not take null ('{node.field.text}')")
        return column.in_(values)


def normalise_datetime(text: str, ref: FieldRef | None = None) -> str:
    """Accept 'YYYY-MM-DDTHH:MM:SS[.fff]Z' (or a date) and return the stored canonical form."""
    candidate = text.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", candidate):
        candidate += "T00:00:00Z"
    try:
        moment = datetime.fromisoformat(candidate.replace("Z", "+00:00"))
    except ValueError:
        where = f"Field '{ref.text}'" if ref else "Value"
        raise VqlError("INVALID_FILTER", f"{where} is a datetime: use 'YYYY-MM-DDTHH:MM:SS.SSSZ', not {text!r}") \
            from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def compile_query(query: Query, store: Store) -> Compiled:
    obj = store.model.objects.get(query.object_name.lower())
    if obj is None:
        raise VqlError("INCORRECT_QUERY_SYNTAX_ERROR",
                       f"Unknown object '{query.object_name}' in FROM")
    c = _Compiler(store, obj)
    selected = []
    for ref in query.fields:
        column, f = c.resolve(ref, "SELECT")
        selected.append(Selected(ref.text, column, f))
    where = c.condition(query.where) if query.where is not None else None
    order: list[tuple[ColumnElement, bool]] = []
    for ref, descending in query.order:
        column, _ = c.resolve(ref, "ORDER BY")
        order.append((column, descending))
    if not any(col is c.base.c.id for col, _ in order):
        order.append((c.base.c.id, False))   # a total order, so pages never overlap or skip
    from_clause = c.base
    for alias, onclause in c.joins.values():
        from_clause = from_clause.outerjoin(alias, onclause)
    columns = [s.column.label(f"c{i}") for i, s in enumerate(selected)]
    columns += [col.label(f"k{i}") for i, (col, _) in enumerate(order)]
    return Compiled(obj.name, select(*columns).select_from(from_clause), [where] if where is not None else [],
                    selected, order, select(c.base.c.id).select_from(from_clause), query.pagesize, query.pageoffset)


def keyset_after(order: list[tuple[ColumnElement, bool]], last_key: tuple) -> tuple[ColumnElement | None, bool]:
    """Condition for the rows after last_key in this order, and whether it is exact.

    SQLite sorts NULL first ascending and last descending. The condition always starts with a
    range on the first sort column so that SQLite seeks in its index instead of scanning it.
    For a descending first column that range leaves out the NULL rows, which come after every
    other row: the condition is then not exact, and a short page must be re-read by OFFSET.
    Returns (None, False) when a NULL in last_key makes the position ambiguous.
    """
    if any(v is None for v in last_key):
        return None, False
    # Bound as literals: SQLAlchemy refuses < and > against a bare Python boolean.
    last_key = tuple(literal(v, type_=col.type) for v, (col, _) in zip(last_key, order))

    def after(i: int) -> ColumnElement:
        column, descending = order[i]
        beyond = or_(column < last_key[i], column.is_(None)) if descending else column > last_key[i]
        if i == len(order) - 1:
            return beyond
        return or_(beyond, and_(column == last_key[i], after(i + 1)))

    lead, descending = order[0]
    if not descending:
        return and_(lead >= last_key[0], after(0)), True
    rest = lead < last_key[0] if len(order) == 1 else or_(lead < last_key[0],
                                                          and_(lead == last_key[0], after(1)))
    return and_(lead <= last_key[0], rest), False
