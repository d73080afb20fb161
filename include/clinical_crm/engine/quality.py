"""The data-quality gate: one Great Expectations verdict per suite per run decides which rows
are quarantined and why; Data Docs, the run's JSON summary, the threshold.

The rules are declared in clinical_crm.checks. The failing rows are the unexpected rows of
GX's validation result, named by the check frame's `source_id`: what the Data Docs show is what
the quarantine holds. The check frames of all of a run's chunks are validated at once, then the
rows are read again to stage the valid ones (`CheckedRows`).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import pandas as pd
import pyarrow as pa

from clinical_crm import settings
from clinical_crm.checks import SOURCE_ID, SUITES, Rule, load_gx
from clinical_crm.engine import staging, storage
from clinical_crm.errors import QualityThresholdExceeded
from clinical_crm.values import blank

log = logging.getLogger(__name__)

# Every failing row's source_id, and only that (not its value, nor a query naming every id):
# the quarantine needs all of them, and the stored result stays a list of ids per expectation.
RESULT_FORMAT = {"result_format": "COMPLETE", "unexpected_index_column_names": [SOURCE_ID],
                 "exclude_unexpected_values": True, "return_unexpected_index_query": False,
                 "partial_unexpected_count": 20}


def import_gx() -> None:
    """Import Great Expectations now (seconds, and most of the objects the process holds)."""
    load_gx()


@dataclass(frozen=True)
class Verdict:
    """What GX decided for one object's rows: a summary per suite, and each failing row's
    (rule name, reason) pairs in rule order, by source_id, in the check frame's row order."""

    suites: list[dict]
    findings: dict[str, list[tuple[str, str]]]
    per_rule: dict[str, int]  # failing rows per rule (the rules with any), in rule order
    data_docs: str | None = None  # index.html of the Data Docs (a stored Validator only)


# ---------------------------------------------------------------- a run's check frames


def compact(checks: pd.DataFrame) -> pa.Table:
    """A chunk's check frame as held until the run's verdict, in Arrow, with no Python object
    per value: text dictionary-encoded (channels, dates, persons repeat) but the record id."""
    columns = {}
    for name, values in checks.items():
        if pd.api.types.is_numeric_dtype(values):  # counts, date numbers, booleans
            columns[name] = pa.array(values)
        else:
            text = pa.array(values, type=pa.string(), from_pandas=True)
            columns[name] = text if name == SOURCE_ID else text.dictionary_encode()
    return pa.table(columns)


def joined(tables: list[pa.Table]) -> pd.DataFrame:
    """Compact check frames as one frame (0..n-1): the dictionaries as categories, unified
    across the chunks; the record id as Arrow text. The tables are emptied (their memory freed
    column by column as the frame is made)."""
    if not tables:
        return pd.DataFrame()
    table = pa.concat_tables(tables)
    tables.clear()
    return table.to_pandas(types_mapper={pa.string(): pd.StringDtype("pyarrow")}.get,
                           self_destruct=True, split_blocks=True)


class CheckedRows:
    """The rows of one staged file, each once (the last copy read: a quarantined record read
    again by id may also have changed in the window), judged by one verdict.

    `judge` reads the file once, builds each chunk's check frame (`checks_of(chunk)`), holds it
    compact and validates them all at once; `chunks` reads the file again and yields each
    chunk's unique rows, with the matched target id column, and which of them fail. The seen
    ids stay in `seen`. Pandas categories per chunk kept a Python string per distinct value for
    their hash tables (+500 MiB at 1,000,000 rows of 20,000 Persons a chunk): Arrow instead."""

    def __init__(self, path: str | None, matched_column: str):
        self.path, self.matched_column = path, matched_column
        self.seen = staging.IdSet()
        self._matched: list[pd.Series] = []  # per chunk read: the kept rows' matched ids, by row index

    def judge(self, validator: Validator, object_name: str, rules: list[Rule],
              checks_of: Callable[[pd.DataFrame], pd.DataFrame]) -> Verdict:
        return validator.verdict(object_name, joined(list(self._check_frames(checks_of))), rules)

    def _check_frames(self, checks_of: Callable[[pd.DataFrame], pd.DataFrame]) -> Iterator[pa.Table]:
        for chunk in staging.read_chunks(self.path):
            chunk = chunk[~self.seen.isin(chunk["id"])].drop_duplicates("id", keep="last")
            self.seen.add(chunk["id"])
            if chunk.empty:
                self._matched.append(pd.Series([], dtype=object))
                continue
            checks = checks_of(chunk)
            self._matched.append(checks[self.matched_column].astype("string[pyarrow]"))
            yield compact(checks.drop(columns=[self.matched_column]))

    def chunks(self, verdict: Verdict) -> Iterator[tuple[pd.DataFrame, pd.Series]]:
        failing = list(verdict.findings)
        for chunk, matched in zip(staging.read_chunks(self.path), self._matched):
            if not matched.empty:  # the same file read the same way: the rows judge kept
                chunk = chunk.loc[matched.index].assign(**{self.matched_column: matched})
                yield chunk, chunk["id"].isin(failing)


# ---------------------------------------------------------------- Great Expectations


@dataclass
class Validator:
    """One GX file context per connection, at <reports>/<connection>/gx under the storage root;
    a run's validations go in it and its Data Docs are built with them. `stored=False`: an
    ephemeral context, nothing written (reconciliation).

    Both DAGs of a connection (and its housekeeping) share the project: one writer at a time,
    by the ledger's named lock `gx:<connection>` (a PostgreSQL advisory lock across hosts).
    GX's file context needs a local folder: on a local root it works in place, as it always
    did; on a remote root (object storage) each locked block works in a local copy of the live
    project (`WorkingCopy`: pulled, then what changed pushed back)."""

    connection: str
    run_key: str
    stored: bool = True
    keep_runs: int = 24  # runs the live project and its Data Docs index keep (retention.data_docs_runs)
    ledger: Any = None  # the run's Ledger (its lock); None: Ledger() when a lock is first needed
    root: Path = field(init=False)  # the GX project folder GX works in (a working copy's on a remote root)

    def __post_init__(self):
        self.url = storage.join(settings.reports_url(), self.connection, "gx")  # GX makes this folder itself
        self.local = storage.is_local(self.url)
        self.root = storage.local_folder(self.url) if self.local else Path(tempfile.gettempdir(), "unpulled-gx")
        self._context = None
        self._copy: WorkingCopy | None = None

    @property
    def context(self):
        if self._context is None:
            if self.stored and not self.local and self._copy is None:
                raise RuntimeError("a GX project on remote storage is only open inside the Validator's lock")
            gx = load_gx()
            from great_expectations.data_context.types.base import ProgressBarsConfig
            from great_expectations.execution_engine import pandas_execution_engine

            # GX fingerprints a pandas batch under 1 GB by hashing every value, for a batch marker
            # nothing here reads: at 1,000,000 rows ~1 s and ~100 MiB (the ids as Python strings)
            pandas_execution_engine.HASH_THRESHOLD = 0

            if self.stored:
                self.root.parent.mkdir(parents=True, exist_ok=True)
                context = gx.get_context(mode="file", project_root_dir=str(self.root.parent))
            else:
                context = gx.get_context(mode="ephemeral")
            context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
            if self.stored:
                context.variables.save()
            self._context = context
        return self._context

    @contextlib.contextmanager
    def _locked(self):
        """One writer of the connection's GX project at a time (the ledger's lock); the project
        re-read inside it (the other DAG may have changed it). On a remote root the block works
        in a fresh working copy, pushed back only when the block succeeds."""
        if not self.stored:
            yield
            return
        if self.ledger is None:
            from clinical_crm.engine.ledger import Ledger

            self.ledger = Ledger()
        with self.ledger.exclusive(gx_lock(self.connection)):
            self._context = None
            if self.local:
                yield
                return
            with WorkingCopy(self.url) as copy:
                self._copy, self.root = copy, copy.root
                try:
                    yield
                    copy.push()
                finally:
                    self._copy, self._context = None, None

    def verdict(self, object_name: str, checks: pd.DataFrame, rules: list[Rule]) -> Verdict:
        """Validate each suite over the whole check frame (one row per record, `source_id`
        unique, an unnamed index) and read the failing rows from GX's result; a stored
        Validator builds this run's Data Docs in the same lock. No rows: no validation."""
        if checks.empty:
            return Verdict([], {}, {})
        with self._locked():
            results = self._run(object_name, checks, rules)
            docs = self._docs() if self.stored else None
        summaries: list[dict] = []
        failing: dict[str, set[str]] = {rule.name: set() for rule in rules}
        for suite_name, result in results:
            summaries.append({"object": object_name, "suite": suite_name, "success": bool(result.success),
                              "evaluated": int(result.statistics.get("evaluated_expectations", 0)),
                              "failed": int(result.statistics.get("unsuccessful_expectations", 0))})
            for r in result.results:
                found = r.result.get("unexpected_index_list")
                if not r.success and found is None:  # not evaluated: never let a row pass unchecked
                    raise RuntimeError(f"GX could not evaluate {r.expectation_config.type} on "
                                       f"{r.expectation_config.kwargs.get('column')}: {r.exception_info}")
                for entry in found or []:
                    failing[r.expectation_config.meta["rule"]].update(entry[SOURCE_ID])
        # GX leaves reference cycles holding its copies of the frame: free them now, not at some later collection
        gc.collect()
        return Verdict(summaries, _findings(checks, rules, failing),
                       {name: len(ids) for name, ids in failing.items() if ids}, docs)

    def _run(self, object_name: str, checks: pd.DataFrame, rules: list[Rule]) -> list[tuple[str, Any]]:
        gx = load_gx()
        context = self.context
        source = context.data_sources.add_or_update_pandas(name=f"{self.connection}_checks")
        try:
            asset = source.get_asset(object_name)
        except LookupError:
            asset = source.add_dataframe_asset(name=object_name)
        try:
            batch = asset.get_batch_definition("whole_frame")
        except (KeyError, LookupError):
            batch = asset.add_batch_definition_whole_dataframe("whole_frame")
        # GX copies the frame it validates (nulls filtered, failing rows taken): only the columns it validates
        checks = checks[[SOURCE_ID, *dict.fromkeys(r.column for r in rules)]]
        results = []
        for suite_name in SUITES:
            expectations = []
            for rule in (r for r in rules if r.suite == suite_name):
                for expectation in rule.expectations():
                    expectation.meta = {**(expectation.meta or {}), "rule": rule.name}  # result -> rule
                    expectations.append(expectation)
            name = f"{self.connection}.{object_name}.{suite_name}"
            suite = context.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))
            definition = context.validation_definitions.add_or_update(
                gx.ValidationDefinition(name=name, data=batch, suite=suite))
            results.append((suite_name, definition.run(batch_parameters={"dataframe": checks},
                                                       result_format=RESULT_FORMAT,
                                                       run_id=gx.RunIdentifier(run_name=self.run_key))))
        return results

    def build_docs(self) -> str:
        """Build this run's Data Docs pages and the index; returns the path of index.html."""
        with self._locked():
            return self._docs()

    def _docs(self) -> str:
        """Only this run's validation results are rendered: by default GX re-renders every result
        the project holds, so each hourly run would redo the pages of all the runs before it.
        GX still lists every result and page the project holds (for the index, and to pick this
        run's): the runs older than the newest `keep_runs` are moved out of the project first
        (`archive_old_runs`), so what it lists, and the index, stay the size of that window."""
        archive_old_runs(self.root, self.keep_runs, protect=self.run_key)
        context = self.context
        mine = [key for key in context.validation_results_store.list_keys() if key.run_id.run_name == self.run_key]
        context.build_data_docs(resource_identifiers=mine)
        if self.local:
            return str(self.root / DOCS_INDEX)
        return storage.join(self.url, DOCS_INDEX.as_posix())  # where the copy pushes it


def gx_lock(connection: str) -> str:
    """The ledger lock's name for a connection's GX project (Validator, housekeeping)."""
    return f"gx:{connection}"


DOCS_INDEX = Path("uncommitted", "data_docs", "local_site", "index.html")


class WorkingCopy:
    """The live GX project of a remote storage root as a local folder, for one locked block.

    Why a copy, not GX's own S3 stores: GX 1.x keeps its project configuration
    (great_expectations.yml, suites, validation definitions) in a local file context in any
    case, and its S3 store backends take boto3 credentials of their own (not the Airflow
    connection ObjectStoragePath uses); the copy keeps one code path for GX (its file
    context, exactly as on a local root) and one set of credentials. It stays small: the live
    project holds the newest `keep_runs` runs only (`archive_old_runs`).

    `pull()` (on entry) copies every file under <remote gx> to <copy>/gx and remembers each
    one's digest; `push()` uploads what is new or changed (this run's results and pages, the
    index, the project files), and the runs archive_old_runs moved to <copy>/gx_archive into
    <remote gx_archive>, and only then deletes the remote files that left the live project. A
    failed block pushes nothing: the remote project stays as the last successful one left it."""

    def __init__(self, url: str):
        self.fs, self.remote = storage.filesystem(url)
        self.remote_archive = f"{self.remote.rsplit('/', 1)[0]}/{archive_dir(Path('gx')).name}"
        self.folder = Path(tempfile.mkdtemp(prefix="clinical-crm-gx-"))
        self.root = self.folder / "gx"
        self.before: dict[str, str] = {}

    def __enter__(self) -> WorkingCopy:
        try:
            self.pull()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def pull(self) -> None:
        remote = sorted(self.fs.find(self.remote)) if self.fs.exists(self.remote) else []
        local = [self.root / p[len(self.remote) + 1:] for p in remote]
        for target in {p.parent for p in local}:
            target.mkdir(parents=True, exist_ok=True)
        if remote:
            self.fs.get(remote, [str(p) for p in local])
        self.root.mkdir(parents=True, exist_ok=True)
        self.before = _digests(self.root)
        log.info("GX project: %d files pulled from %s", len(remote), self.remote)

    def push(self) -> None:
        after = _digests(self.root)
        changed = sorted(rel for rel, digest in after.items() if self.before.get(rel) != digest)
        archived = sorted(_digests(self.folder / "gx_archive"))
        sources = [str(self.root / rel) for rel in changed] + [str(self.folder / "gx_archive" / rel) for rel in archived]
        targets = [f"{self.remote}/{rel}" for rel in changed] + [f"{self.remote_archive}/{rel}" for rel in archived]
        if sources:
            self.fs.put(sources, targets)
        gone = sorted(f"{self.remote}/{rel}" for rel in self.before if rel not in after)
        if gone:
            self.fs.rm(gone)
        log.info("GX project: %d files pushed to %s, %d archived, %d removed from the live project",
                 len(changed), self.remote, len(archived), len(gone))


def _digests(folder: Path) -> dict[str, str]:
    """{relative posix name: sha1 of the content} of every file under folder."""
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes(), usedforsecurity=False).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- the live window of GX history

# <gx>/uncommitted/validations/<connection>/<object>/<suite>/<run name>/<run time>/<batch>.json and
# the page of each at <gx>/uncommitted/data_docs/local_site/validations/<same path>.html
RESULTS = Path("uncommitted", "validations")
PAGES = Path("uncommitted", "data_docs", "local_site", "validations")
SUITE_DEPTH = 3  # our suite names are <connection>.<object>.<suite>: three folders


def archive_dir(root: Path) -> Path:
    """<reports>/<connection>/gx_archive: the results and pages of runs out of the live project
    (kept there `retention.gx_results_days`, then deleted by housekeeping)."""
    return root.parent / "gx_archive"


def _run_folders(root: Path) -> dict[str, tuple[str, list[Path]]]:
    """{run name: (its newest run time, its folders under every suite)} of the live results; the
    suites are few and each holds one folder per run of the window: a listing the size of it."""
    found: dict[str, tuple[str, list[Path]]] = {}
    results = root / RESULTS
    if not results.is_dir():
        return found
    for suite in results.glob("/".join("*" * SUITE_DEPTH)):
        if not suite.is_dir():
            continue
        for run in suite.iterdir():
            times = [t.name for t in run.iterdir()] if run.is_dir() else []
            newest, folders = found.get(run.name, ("", []))
            found[run.name] = (max([newest, *times]), [*folders, run])
    return found


def archive_old_runs(root: Path, keep: int, protect: str | None = None) -> int:
    """Move the validation results and Data Docs pages of the runs older than the newest `keep`
    (by run time) from the live GX project to the archive; returns how many runs moved. The
    caller holds the project's lock. Run `protect` (the current one) stays whatever its time."""
    runs = _run_folders(root)
    if len(runs) <= keep:
        return 0
    by_time = sorted(runs, key=lambda name: runs[name][0], reverse=True)
    old = [name for name in by_time[keep:] if name != protect]
    archive = archive_dir(root)
    for name in old:
        for folder in runs[name][1]:
            suite = folder.parent.relative_to(root / RESULTS)
            for source, target in ((folder, archive / "results" / suite / name),
                                   (root / PAGES / suite / name, archive / "pages" / suite / name)):
                _move(source, target)
    if old:
        log.info("moved the GX results and Data Docs pages of %d older runs to %s", len(old), archive)
    return len(old)


def _move(source: Path, target: Path) -> None:
    """A run's folder into the archive (merged into one already there: the same run name again)."""
    if not source.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        source.rename(target)
        return
    for child in source.iterdir():
        if not (target / child.name).exists():
            child.rename(target / child.name)
    shutil.rmtree(source, ignore_errors=True)


def _findings(checks: pd.DataFrame, rules: list[Rule], failing: dict[str, set]) -> dict[str, list[tuple[str, str]]]:
    """(rule, reason) of each failing row, by source_id; a reason reads the row with missing values as None."""
    ids = set().union(*failing.values())
    findings = {}
    for row in checks[checks[SOURCE_ID].isin(ids)].to_dict("records"):
        row = {k: (None if blank(v) else v) for k, v in row.items()}
        findings[row[SOURCE_ID]] = [(r.name, r.reason(row)) for r in rules if row[SOURCE_ID] in failing[r.name]]
    return findings


def write_summary(connection: str, direction: str, run_key: str, summary: dict) -> str:
    """The run's JSON summary next to the Data Docs: <reports>/<connection>/runs/<direction>/<run>.json"""
    from clinical_crm.engine.quarantine_report import run_file

    path = run_file(connection, direction, run_key, ".json")
    path.write_text(json.dumps(summary, indent=2, default=str))
    return storage.name(path)


def check_threshold(rows: int, failing: int, max_failing_share: float) -> None:
    """Fail the run (and load nothing) only when the failing share passes the threshold."""
    if rows and failing / rows > max_failing_share:
        raise QualityThresholdExceeded(
            f"{failing} of {rows} rows ({failing / rows:.0%}) failed the data quality checks, "
            f"more than the allowed {max_failing_share:.0%}: nothing was loaded")
