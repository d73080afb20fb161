"""The typed hand-offs between the steps of one run; XCom carries them as small JSON dicts
(paths and counts, never data)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from clinical_crm.engine.windows import Window
from clinical_crm.times import as_utc

@dataclass(frozen=True)
class RunContext:
    """What every step of a run needs to know: made by `begin`, passed to every later step."""

    connection: str
    direction: str           # the flow's name
    dag_run_id: str
    window_start: str        # ISO 8601, UTC
    window_end: str
    active: bool
    run_dir: str             # the run's staging folder (a URL)
    run_id: int              # the ledger's run row

    @property
    def window(self) -> Window:
        start, end = as_utc(self.window_start), as_utc(self.window_end)
        if start is None or end is None:
            raise ValueError(f"run {self.dag_run_id} has no window: {self.window_start!r} .. {self.window_end!r}")
        return Window(start, end)

    def to_xcom(self) -> dict:
        return asdict(self)

    @classmethod
    def from_xcom(cls, data: dict | RunContext) -> RunContext:
        return data if isinstance(data, RunContext) else cls(**data)


@dataclass(frozen=True)
class StagedFile:
    """One staged parquet file: where it is and how many rows it holds."""

    path: str
    rows: int


@dataclass(frozen=True)
class Staged:
    """Named staged files of one step (extracted frames, validated rows, target records)."""

    files: dict[str, StagedFile] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __getitem__(self, name: str) -> StagedFile:
        return self.files[name]

    def path(self, name: str) -> str | None:
        return self.files[name].path if name in self.files else None

    def rows(self, name: str) -> int:
        return self.files[name].rows if name in self.files else 0

    def to_xcom(self) -> dict:
        return {name: asdict(f) for name, f in self.files.items()}

    @classmethod
    def from_xcom(cls, data: dict | Staged | None) -> Staged:
        if isinstance(data, Staged):
            return data
        return cls({name: StagedFile(**f) for name, f in (data or {}).items()})
