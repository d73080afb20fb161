"""A run's quarantine as files, readable without the ledger or the UI page.

The validate step writes every record it holds back next to the run's data-quality summary:

    <reports>/<connection>/runs/<direction>/<dag_run_id>.quarantine.csv
    <reports>/<connection>/runs/<direction>/<dag_run_id>.quarantine.json

(<reports> = <storage root>/reports, engine/storage.py: a local folder or object storage)

one row per record: source id, source object, the rules it breaks, the reason of each, and
whether this run quarantined it first (`new`) or an earlier run did (it is read again every run
until it passes). Rows carry record ids and rule texts only: the reasons name records by id,
never a person's name or email. Both files are written as the run goes (chunk by chunk), so a
run with 100,000 quarantined records does not hold them in memory.
"""
from __future__ import annotations

import csv
import json
import logging
from typing import Any

from clinical_crm import settings
from clinical_crm.engine import storage

log = logging.getLogger(__name__)

COLUMNS = ["source_id", "object", "rules", "reasons", "new"]
LOG_FIRST = 20  # records the task log lists with their reasons


def run_file(connection: str, direction: str, run_key: str, suffix: str) -> storage.StoragePath:
    """<reports>/<connection>/runs/<direction>/<run><suffix> (the run id made safe for a file
    name), under the storage root: a local Path, or an ObjectStoragePath (engine/storage.py)."""
    path = storage.reports(connection, "runs", direction, f"{settings.file_safe(run_key)}{suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class QuarantineReport:
    """Writes the quarantined records of one run's validate step to CSV and JSON.

    `add(object, findings, new)` per chunk: `findings` maps a source id to its [(rule, reason)];
    `new` is the set of those ids no earlier run quarantined. `close()` returns both paths."""

    def __init__(self, connection: str, direction: str, run_key: str):
        self.csv_path = run_file(connection, direction, run_key, ".quarantine.csv")
        self.json_path = run_file(connection, direction, run_key, ".quarantine.json")
        self.rows = self.new = 0
        self.first: list[dict] = []
        self._csv_file = storage.open_text(self.csv_path, newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_file, COLUMNS)
        self._csv.writeheader()
        self._json = storage.open_text(self.json_path, encoding="utf-8")
        self._json.write("[")

    def add(self, object_name: str, findings: dict[str, list[tuple[str, str]]], new: set[str]) -> None:
        for source_id, found in findings.items():
            row: dict[str, Any] = {"source_id": source_id, "object": object_name, "rules": [rule for rule, _ in found],
                   "reasons": [reason for _, reason in found], "new": source_id in new}
            self._csv.writerow({**row, "rules": "; ".join(row["rules"]), "reasons": "; ".join(row["reasons"])})
            self._json.write(("," if self.rows else "") + "\n  " + json.dumps(row, ensure_ascii=False))
            self.rows += 1
            self.new += row["new"]
            if len(self.first) < LOG_FIRST:
                self.first.append(row)

    def close(self) -> dict:
        """Close both files; returns {"csv", "json", "records", "new"} for the run's summary."""
        self._json.write("\n]\n" if self.rows else "]\n")
        self._json.close()
        self._csv_file.close()
        return {"csv": storage.name(self.csv_path), "json": storage.name(self.json_path), "records": self.rows,
                "new": self.new}

    def log_first(self) -> None:
        """The task log lists the first LOG_FIRST quarantined records with their reasons."""
        if not self.rows:
            return
        log.warning("%d records quarantined (%d new in this run); the first %d:", self.rows, self.new, len(self.first))
        for row in self.first:
            log.warning("  %s %s%s: %s", row["object"], row["source_id"], " (new)" if row["new"] else "",
                        "; ".join(f"[{rule}] {reason}" for rule, reason in zip(row["rules"], row["reasons"])))
        log.warning("all of them: %s", storage.name(self.csv_path))
