"""scripts/audit_offline.py: OSV matching of pinned versions against a local advisory database."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml
from packaging.version import Version

from support import REPO

spec = importlib.util.spec_from_file_location("audit_offline", REPO / "scripts" / "audit_offline.py")
audit_offline = importlib.util.module_from_spec(spec)
sys.modules["audit_offline"] = audit_offline      # its dataclass needs the module registered
spec.loader.exec_module(audit_offline)


def advisory(folder: Path, package: str, ident: str, events: list[dict], versions=(), withdrawn=None):
    (folder / "vulns" / package).mkdir(parents=True, exist_ok=True)
    body = {"id": ident, "summary": f"{ident} summary", "aliases": [f"CVE-{ident}"],
            "affected": [{"package": {"name": package, "ecosystem": "PyPI"},
                          "ranges": [{"type": "ECOSYSTEM", "events": events},
                                     {"type": "GIT", "events": [{"introduced": "0"}, {"fixed": "abc123"}]}],
                          "versions": list(versions)}]}
    if withdrawn:
        body["withdrawn"] = withdrawn
    (folder / "vulns" / package / f"{ident}.yaml").write_text(yaml.safe_dump(body))


@pytest.mark.parametrize("version, events, expected", [
    ("2.30.0", [{"introduced": "0"}, {"fixed": "2.31.0"}], True),
    ("2.31.0", [{"introduced": "0"}, {"fixed": "2.31.0"}], False),
    ("1.9", [{"introduced": "2.0"}, {"fixed": "2.5"}], False),
    ("2.4.9", [{"fixed": "2.5"}, {"introduced": "2.0"}], True),          # events in any order
    ("3.3.2", [{"introduced": "0"}, {"last_affected": "3.0.3-NA"}], False),  # marker after the release
    ("3.0.3", [{"introduced": "0"}, {"last_affected": "3.0.3"}], True),
    ("1.5", [{"introduced": "0"}, {"fixed": "1.0"}, {"introduced": "1.2"}, {"fixed": "1.6"}], True),
    ("1.1", [{"introduced": "0"}, {"fixed": "1.0"}, {"introduced": "1.2"}, {"fixed": "1.6"}], False),
    ("9.0", [{"introduced": "0"}], True),                                 # no fix yet
    ("9.0", [{"introduced": "0"}, {"fixed": "unknown"}], True),           # unreadable: reported
])
def test_osv_ranges(version, events, expected):
    assert audit_offline.in_range(Version(version), events) is expected


def test_findings_exit_status_and_what_is_read(tmp_path, capsys):
    db = tmp_path / "db"
    advisory(db, "requests", "PYSEC-1", [{"introduced": "0"}, {"fixed": "2.31.0"}])
    advisory(db, "requests", "PYSEC-2", [{"introduced": "0"}, {"fixed": "2.0"}])           # older: not affected
    advisory(db, "requests", "PYSEC-3", [{"introduced": "0"}, {"fixed": "9.0"}], withdrawn="2026-01-01")
    advisory(db, "jinja2", "PYSEC-4", [{"introduced": "99"}], versions=["3.1.2"])          # listed version
    advisory(db, "other-package", "PYSEC-5", [{"introduced": "0"}])                         # not pinned
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("requests==2.30.0\n# a comment\nJinja2==3.1.2  # pinned\n")

    assert audit_offline.main(["--db", str(db), "--requirements", str(requirements)]) == 1
    out = capsys.readouterr().out
    assert "requests==2.30.0: PYSEC-1 (CVE-PYSEC-1); fixed in: 2.31.0;" in out     # GIT ranges ignored
    assert "jinja2==3.1.2: PYSEC-4" in out and "no fixed version" in out
    assert "PYSEC-2" not in out and "PYSEC-3" not in out and "PYSEC-5" not in out
    assert "2 known vulnerabilities, 1 with a fixed version available" in out

    requirements.write_text("requests==2.31.0\n")
    assert audit_offline.main(["--db", str(db / "vulns"), "--requirements", str(requirements)]) == 0


def test_unpinned_requirement_and_missing_database_are_clear_errors(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("requests>=2\n")
    with pytest.raises(SystemExit, match="requests is not pinned to one version"):
        audit_offline.pinned(requirements)
    with pytest.raises(SystemExit, match="not a PyPA advisory database"):
        audit_offline.audit({}, tmp_path / "nowhere")


def test_an_advisory_with_several_entries_for_a_package_is_reported_once(tmp_path, capsys):
    entry = {"package": {"name": "requests", "ecosystem": "PyPI"},
             "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "3.0"}]}]}
    (tmp_path / "vulns" / "requests").mkdir(parents=True)
    (tmp_path / "vulns" / "requests" / "PYSEC-9.yaml").write_text(
        yaml.safe_dump({"id": "PYSEC-9", "affected": [entry, entry]}))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("requests==2.0\n")
    assert audit_offline.main(["--db", str(tmp_path), "--requirements", str(requirements)]) == 1
    assert capsys.readouterr().out.count("PYSEC-9") == 1
