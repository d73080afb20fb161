"""scripts/audit_offline.py: OSV matching of pinned versions against a local advisory database."""
from __future__ import annotations

import importlib.util
import sys
from datetime import datetime, timezone
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


def test_both_pinned_sets_are_audited_and_the_dates_printed(tmp_path, capsys):
    (tmp_path / "vulns" / "requests").mkdir(parents=True)
    (tmp_path / "vulns" / "requests" / "PYSEC-7.yaml").write_text(yaml.safe_dump({
        "id": "PYSEC-7", "modified": "2026-07-23T10:00:00Z",
        "affected": [{"package": {"name": "requests", "ecosystem": "PyPI"},
                      "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "1.0"}]}]}]}))
    (tmp_path / "vulns" / "requests" / "PYSEC-8.yaml").write_text("id: PYSEC-8\nmodified: '2099-01-01T00:00:00Z'\n")
    assert audit_offline.main(["--db", str(tmp_path)]) == 0  # the project's own two files
    out = capsys.readouterr().out
    runtime = audit_offline.pinned(REPO / "requirements.txt")
    dev = audit_offline.pinned(REPO / "requirements-dev.txt")
    assert runtime.keys() < dev.keys() and "pytest" in dev and "pytest" not in runtime
    assert (f"{len(dev)} pinned packages (requirements.txt: {len(runtime)}, requirements-dev.txt: {len(dev)})"
            in out)
    today = datetime.now(timezone.utc).date().isoformat()
    # a date later than today (one advisory of a real copy has one) is not the copy's date
    assert f"audit of {today}; advisory database {tmp_path} as of 2026-07-23 (newest advisory)" in out


def test_a_git_checkout_is_dated_by_its_last_commit(tmp_path):
    import subprocess

    (tmp_path / "vulns").mkdir()
    (tmp_path / "vulns" / "x.yaml").write_text("id: X\nmodified: 2020-01-01T00:00:00Z\n")
    env = {"GIT_AUTHOR_DATE": "2026-07-23T12:00:00Z", "GIT_COMMITTER_DATE": "2026-07-23T12:00:00Z",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.test", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.test", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "copy"]):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, env=env)
    today = datetime.now(timezone.utc).date()
    assert audit_offline.database_date(tmp_path, today) == "2026-07-23 (last commit)"
    assert audit_offline.database_date(tmp_path / "vulns", today) == "2026-07-23 (last commit)"


def test_two_different_pins_of_one_package_are_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("requests==2.31.0\n")
    (tmp_path / "b.txt").write_text("requests==2.32.0\npytest==9.0\n")
    with pytest.raises(SystemExit, match="requests is pinned to 2.31.0 in .*a.txt and to 2.32.0 in .*b.txt"):
        audit_offline.pinned_sets([tmp_path / "a.txt", tmp_path / "b.txt"])
    (tmp_path / "b.txt").write_text("requests==2.31.0\npytest==9.0\n")
    assert set(audit_offline.pinned_sets([tmp_path / "a.txt", tmp_path / "b.txt"])) == {"requests", "pytest"}
