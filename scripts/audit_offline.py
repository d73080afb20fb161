"""Audit the pinned requirements against a local copy of the PyPA advisory database (OSV format).

    .venv/bin/python scripts/audit_offline.py --db PATH [--requirements FILE ...]

`pip-audit -r requirements.txt` is the audit of record, but it needs PyPI's JSON API or
api.osv.dev. Where neither is reachable, this reads the same advisories from a checkout (or
export) of https://github.com/pypa/advisory-database: PATH is its root or its `vulns` folder.
Every advisory of a pinned package is matched with the OSV rules (explicit `versions`, or
`ECOSYSTEM` ranges of introduced / fixed / last_affected events); withdrawn ones are skipped.
By default both pinned sets are read: requirements.txt (runtime) and requirements-dev.txt (test).

Prints the date of the audit and of the copy (its last commit in a git checkout, else the newest
advisory in it), then one line per finding. The answer is as fresh as the copy.
Exit status: 1 when a pinned version has a known vulnerability with a fixed version available,
0 otherwise (findings without any fix are listed but do not fail).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
REPO = Path(__file__).resolve().parents[1]
DEFAULT_REQUIREMENTS = [REPO / "requirements.txt", REPO / "requirements-dev.txt"]


@dataclass
class Finding:
    package: str
    version: str
    advisory: str
    aliases: list[str]
    fixed: list[str]
    summary: str


def pinned(requirements: Path) -> dict[str, Version]:
    """name -> exact version of every `name==version` line (comments and options skipped)."""
    pins: dict[str, Version] = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise SystemExit(f"{requirements}: cannot read {line!r}: {exc}") from None
        exact = [s.version for s in req.specifier if s.operator in ("==", "===")]
        if not exact:
            raise SystemExit(f"{requirements}: {req.name} is not pinned to one version")
        version = _version(exact[0])
        if version is None:
            raise SystemExit(f"{requirements}: {req.name}=={exact[0]} is not a version this audit can compare")
        pins[canonicalize_name(req.name)] = version
    return pins


def pinned_sets(files: list[Path]) -> dict[str, Version]:
    """The pins of several requirements files; a package pinned to two versions is an error (the
    dev set is compiled with the runtime set as a constraint, so they must agree)."""
    pins: dict[str, Version] = {}
    where: dict[str, Path] = {}
    for path in files:
        for name, version in pinned(path).items():
            if name in pins and pins[name] != version:
                raise SystemExit(f"{name} is pinned to {pins[name]} in {where[name]} and to {version} in {path}")
            pins[name], where[name] = version, where.get(name, path)
    return pins


def database_date(db: Path, today: date) -> str:
    """When the copy was made: its last commit's date in a git checkout, else the newest `modified`
    of its advisories (one advisory of the 2026-07-23 copy is dated 2027: later than today is ignored)."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(db), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    top = git("rev-parse", "--show-toplevel")  # the copy's own checkout, not a repository around it
    if top and Path(top).resolve() in (db.resolve(), db.resolve().parent) and git("log", "-1", "--format=%cs"):
        return f"{git('log', '-1', '--format=%cs')} (last commit)"
    newest = None
    for path in db.rglob("*.yaml"):
        found = re.search(r"^modified:\s*['\"]?(\d{4}-\d{2}-\d{2})", path.read_text(errors="replace"), flags=re.M)
        if found and found.group(1) <= today.isoformat() and (newest is None or found.group(1) > newest):
            newest = found.group(1)
    return f"{newest} (newest advisory)" if newest else "unknown"


def _version(text) -> Version | None:
    """A version; some advisories append a marker ("3.0.3-NA"): its release part is used then."""
    try:
        return Version(str(text))
    except InvalidVersion:
        release = re.match(r"\d+(\.\d+)*", str(text))
        return Version(release.group(0)) if release else None


def in_range(version: Version, events: list[dict]) -> bool:
    """OSV ECOSYSTEM range: walk the events in version order; the last one at or below
    `version` decides (introduced: affected; fixed: not; last_affected: affected up to it).
    A range with an event that cannot be read counts as affecting (reported, to be looked at)."""
    ordered = []
    for event in events:
        (kind, value), = event.items()
        at = Version("0") if value == "0" else _version(value)
        if at is None:
            return True
        ordered.append((at, kind))
    affected = False
    for at, kind in sorted(ordered, key=lambda e: e[0]):
        if kind == "introduced" and version >= at:
            affected = True
        elif kind == "fixed" and version >= at:
            affected = False
        elif kind == "last_affected" and version > at:
            affected = False
    return affected


def affects(entry: dict, version: Version) -> bool:
    if any(_version(v) == version for v in entry.get("versions") or []):
        return True
    return any(in_range(version, r.get("events") or []) for r in entry.get("ranges") or []
               if r.get("type") == "ECOSYSTEM")


def audit(pins: dict[str, Version], db: Path) -> tuple[list[Finding], int]:
    """Findings for the pinned versions, and how many advisories were read."""
    root = db / "vulns" if (db / "vulns").is_dir() else db
    if not root.is_dir():
        raise SystemExit(f"{db}: not a PyPA advisory database checkout (no vulns folder)")
    folders = [d for d in root.iterdir() if d.is_dir()]
    if not folders:
        raise SystemExit(f"{root}: no advisories found")
    findings: list[Finding] = []
    reported: set[tuple[str, str]] = set()  # (package, advisory): once, even with several entries
    read = 0
    # one folder per package, named by its normalized name: only the pinned packages' are read
    for path in sorted(p for d in folders if canonicalize_name(d.name) in pins for p in d.glob("*.yaml")):
        advisory = yaml.load(path.read_text(), Loader=_LOADER) or {}
        read += 1
        if advisory.get("withdrawn"):
            continue
        for entry in advisory.get("affected") or []:
            package = entry.get("package") or {}
            if package.get("ecosystem") != "PyPI":
                continue
            name = canonicalize_name(package.get("name", ""))
            ident = advisory.get("id", path.stem)
            if name not in pins or (name, ident) in reported or not affects(entry, pins[name]):
                continue
            reported.add((name, ident))
            fixed = sorted({e["fixed"] for r in entry.get("ranges") or [] if r.get("type") == "ECOSYSTEM"
                            for e in r.get("events") or [] if "fixed" in e}, key=lambda v: _version(v) or Version("0"))
            details = (advisory.get("summary") or advisory.get("details") or "").strip().splitlines()
            findings.append(Finding(name, str(pins[name]), ident,
                                    list(advisory.get("aliases") or []), fixed, details[0][:120] if details else ""))
    return findings, read


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, type=Path, help="PyPA advisory-database checkout or its vulns folder")
    parser.add_argument("--requirements", type=Path, action="append",
                        help="a pinned requirements file (repeatable); default: requirements.txt and requirements-dev.txt")
    args = parser.parse_args(argv)
    files = args.requirements or DEFAULT_REQUIREMENTS
    pins = pinned_sets(files)
    findings, read = audit(pins, args.db)
    today = datetime.now(timezone.utc).date()
    print(f"audit of {today.isoformat()}; advisory database {args.db} as of {database_date(args.db, today)}")
    print(f"{len(pins)} pinned packages ({', '.join(f'{f.name}: {len(pinned(f))}' for f in files)}) "
          f"checked against {read} advisories of theirs")
    for f in findings:
        fix = ", ".join(f.fixed) if f.fixed else "no fixed version"
        print(f"  {f.package}=={f.version}: {f.advisory} ({', '.join(f.aliases) or 'no aliases'}); "
              f"fixed in: {fix}; {f.summary}")
    fixable = [f for f in findings if any((_version(v) or Version("0")) > Version(f.version) for v in f.fixed)]
    print(f"{len(findings)} known vulnerabilities, {len(fixable)} with a fixed version available")
    return 1 if fixable else 0


if __name__ == "__main__":
    sys.exit(main())
