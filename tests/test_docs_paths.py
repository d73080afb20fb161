"""Every path and module the README and docs/*.md name exists (issue 19: stale names had crept in).

Checked in README.md and docs/*.md:

- repository paths in backticks or link targets: `include/...`, `docs/...`, `scripts/...`,
  `bench/...`, `tests/...`, `dags/...`, `.ci/...`, top-level files; links relative to their document;
- paths written from a folder inside the packages (`engine/load.py`, `flows/`, `models/crm.yaml`,
  `airflow/notifier.RunFailedNotifier`) and bare file names (`runner.py`): some file of the
  repository has that path or name (and defines the name after a module's path);
- module paths (`clinical_crm.engine.runner`, `clinical_crm.airflow.plugin:ClinicalCrmPlugin`,
  `engine.load.SOURCE_ID`): the module exists and *defines* the name that follows it (a module
  that only imports it is not where it lives; a package's re-exports count);
- the layout listings in fenced blocks (`context.py    RunContext, Staged, StagedFile`): each file
  exists, and each code name listed beside it that the packages define is defined in that file.

Not checked: placeholders (`<connection>`, `*`, `{v}`), what runs and set-up create (`data/`,
`test-artifacts/`, `.venv/`, `*.egg-info`), URLs and API paths, names outside the repository
(`../shared/...`), headings behind `#anchors`.
"""
from __future__ import annotations

import ast
import os
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES_ROOT = ROOT / "include"
PACKAGES = ("clinical_crm", "vault_sandbox")

REPO_ROOTS = {"include", "docs", "scripts", "bench", "tests", "dags", ".ci"}
GENERATED = {"data", "test-artifacts", ".venv", "build", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
SKIPPED_DIRS = GENERATED | {".git", "__pycache__"}
FILE_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".lark", ".sh", ".mako", ".cfg", ".ini"}
PLACEHOLDER = re.compile(r"[<>*{}|=]|://|^[/~-]")
DOTTED = re.compile(r"[A-Za-z_]\w*(?:[.:][A-Za-z_]\w*)+")
FILE_TOKEN = re.compile(r"[\w./-]*\w\.py(?!\w)")


# ---------------------------------------------------------------- the repository


@cache
def repository() -> tuple[frozenset[str], frozenset[str]]:
    """(files, folders) of the repository as relative POSIX paths, without generated folders."""
    files, folders = set(), set()
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [s for s in subfolders if s not in SKIPPED_DIRS and not s.endswith(".egg-info")]
        relative = Path(folder).relative_to(ROOT).as_posix()
        if relative != ".":
            folders.add(relative)
        files.update(f"{relative}/{n}" if relative != "." else n for n in names)
    return frozenset(files), frozenset(folders)


def exists(path: str) -> bool:
    files, folders = repository()
    return path.rstrip("/") in files | folders


def ending_with(path: str) -> list[str]:
    """Repository files and folders whose path ends with `path` (whole components)."""
    files, folders = repository()
    tail = path.strip("/")
    return sorted(p for p in files | folders if p == tail or p.endswith("/" + tail))


@cache
def modules() -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for file in (PACKAGES_ROOT / package).rglob("*.py"):
            parts = list(file.relative_to(PACKAGES_ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = file
    return found


def _top_level(body: list[ast.stmt]):
    for node in body:
        if isinstance(node, (ast.If, ast.Try)):  # `if TYPE_CHECKING:`, `try: import ...`
            yield from _top_level(node.body + node.orelse + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                yield from _top_level(handler.body)
        else:
            yield node


@cache
def names_of(file: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(names the module defines, names it imports or lists in __all__) at its top level."""
    defined, imported = set(), set()
    for node in _top_level(ast.parse(file.read_text(encoding="utf-8")).body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defined.add(name.id)
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
                imported.update(e.value for e in ast.walk(node.value) if isinstance(e, ast.Constant))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imported.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(defined), frozenset(imported)


def provides(module: str, name: str) -> bool:
    """Whether `name` lives in `module`: defined there, or for a package re-exported or a submodule."""
    file = modules()[module]
    defined, imported = names_of(file)
    if name in defined:
        return True
    return file.name == "__init__.py" and (name in imported or f"{module}.{name}" in modules())


@cache
def defined_anywhere() -> dict[str, frozenset[str]]:
    """Every top-level name the packages define -> the modules that define it."""
    where: dict[str, set[str]] = {}
    for module, file in modules().items():
        for name in names_of(file)[0]:
            where.setdefault(name, set()).add(module)
    return {name: frozenset(found) for name, found in where.items()}


def module_of_file(path: str) -> str | None:
    """The dotted module of a repository path under include/ (None elsewhere)."""
    parts = Path(path).with_suffix("").parts
    if parts[:1] != ("include",) or path.endswith("/__init__.py"):
        return None
    return ".".join(parts[1:])


# ---------------------------------------------------------------- one name in a document


def check_module_path(token: str) -> str | None:
    """A dotted module path (absolute, or from a subpackage of clinical_crm): None when right."""
    parts = re.split(r"[.:]", token)
    absolute = parts[0] in PACKAGES
    if not absolute:
        # `engine.load.SOURCE_ID`: only where the first two parts are a module of clinical_crm
        if len(parts) < 2 or f"clinical_crm.{parts[0]}.{parts[1]}" not in modules():
            return None
        parts = ["clinical_crm", *parts]
    known = modules()
    longest = max((n for n in range(1, len(parts) + 1) if ".".join(parts[:n]) in known), default=0)
    if longest == 0:
        return f"no module {token}"
    module, rest = ".".join(parts[:longest]), parts[longest:]
    if rest and not provides(module, rest[0]):
        elsewhere = sorted(defined_anywhere().get(rest[0], ()))
        return f"{module} does not define {rest[0]}" + (f" (defined in {', '.join(elsewhere)})" if elsewhere else "")
    return None


def check_path(token: str, document: Path, link: bool) -> str | None:
    """A path in a document: None when it exists (or is not the repository's to check)."""
    token = token.split("#")[0]
    if not token or PLACEHOLDER.search(token) or token.endswith(".egg-info"):
        return None
    if link:
        target = (document.parent / token).resolve()
        if not target.is_relative_to(ROOT):
            return None
        token = target.relative_to(ROOT).as_posix()
    elif token.startswith("../"):
        return None  # outside the repository (e.g. the shared background documents)
    token = token.removeprefix("./")
    first = token.split("/")[0]
    if first in GENERATED:
        return None
    if first in REPO_ROOTS or (link and "/" not in token.rstrip("/")):
        return None if exists(token) else f"no {token}"
    if "/" in token:
        # from a folder inside the packages: `engine/alerts.py`, `airflow/notifier.RunFailedNotifier`
        if first not in {Path(folder).name for folder in repository()[1]}:
            return None  # not this repository's (a Docker image, a GitHub repository, ...)
        if ending_with(token):
            return None
        head, _, name = token.rpartition(".")
        candidates = ending_with(head + ".py") if name.isidentifier() and name[:1].isalpha() else []
        for candidate in candidates:
            module = module_of_file(candidate)
            if module and provides(module, name):
                return None
        if candidates:
            return f"{head}.py does not define {name}"
        return f"no file or folder ends with {token}"
    if Path(token).suffix in FILE_SUFFIXES:
        files = repository()[0]
        return None if any(Path(f).name == token for f in files) else f"no file named {token}"
    return None


def spans(text: str):
    """(line number, name, is a link) of every backtick span's words and link target outside fences."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        for match in re.finditer(r"`([^`]+)`|\]\(([^)\s]+)\)", line):
            if match.group(2) is not None:
                if not re.match(r"[a-z]+:|#", match.group(2)):
                    yield number, match.group(2), True
                continue
            for word in match.group(1).split():
                yield number, word.strip(",;()'\""), False


def layout_lines(text: str):
    """(line number, line) of the lines inside fenced blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            yield number, line


def check_layout_line(line: str) -> list[str]:
    """A line of a layout listing: each `x.py` exists, and the code names listed after it (up to
    the next file) that the packages define are defined in that file."""
    problems = []
    matches = list(FILE_TOKEN.finditer(line))
    for index, match in enumerate(matches):
        token = match.group(0).removeprefix("./")
        if PLACEHOLDER.search(token) or token.split("/")[0] in GENERATED:
            continue
        if "/" in token and token.split("/")[0] in REPO_ROOTS:
            files = [token] if exists(token) else []
        else:
            files = ending_with(token) if "/" in token else [f for f in repository()[0] if Path(f).name == token]
        if not files:
            problems.append(f"no file {token}")
            continue
        file_modules = {m for m in map(module_of_file, files) if m}
        if not file_modules:
            continue
        end = matches[index + 1].start() if index + 1 < len(matches) else len(line)
        listed = re.sub(r"(\w)\([^()]*\)", r"\1()", line[match.end():end])  # call arguments are not listed
        for word in re.finditer(r"[A-Za-z_]\w*(\(\))?", listed):
            name = word.group(0).removesuffix("()")
            code_like = (name[0].isupper() and any(c.islower() for c in name[1:])) or "_" in name.strip("_") \
                or word.group(1)
            if not code_like or name not in defined_anywhere():
                continue
            if not any(provides(m, name) for m in file_modules):
                elsewhere = ", ".join(sorted(defined_anywhere()[name]))
                problems.append(f"{token} lists {name}, which it does not define (defined in {elsewhere})")
    return problems


def check_span(name: str, document: Path, link: bool) -> str | None:
    """One name of a document (a module path, else a path): None when right."""
    dotted = DOTTED.match(name)
    if not link and "/" not in name and dotted and Path(name).suffix not in FILE_SUFFIXES:
        return check_module_path(dotted.group(0))
    return check_path(name, document, link)


def problems_of(document: Path, text: str | None = None) -> list[str]:
    """Every stale name of a document (its text read unless given), as `file:line: what`."""
    text = document.read_text(encoding="utf-8") if text is None else text
    where = document.relative_to(ROOT).as_posix()
    found = []
    for number, name, link in spans(text):
        problem = check_span(name, document, link)
        if problem:
            found.append(f"{where}:{number}: `{name}`: {problem}")
    for number, line in layout_lines(text):
        found += [f"{where}:{number}: {problem}" for problem in check_layout_line(line)]
    return found


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_every_path_a_document_names_exists(document):
    problems = problems_of(document)
    assert not problems, "stale names in the documentation:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("line, problem", [
    ("Field rules (one function each in `include/clinical_crm/transform.py`):", "no include/clinical_crm/transform.py"),
    ("before, the middle (`pipeline.py`, `dag_factory.py`) chose", "no file named pipeline.py"),
    ("Target records carry `engine.load.SOURCE_ID` (`_source_id`)",
     "clinical_crm.engine.load does not define SOURCE_ID (defined in "),
    ("see `clinical_crm.nothing_here`", "clinical_crm does not define nothing_here"),
    ("see `airflow/notifier.NoSuchNotifier`", "airflow/notifier.py does not define NoSuchNotifier"),
    ("see [the guide](docs/no_such_guide.md#section)", "no docs/no_such_guide.md"),
    ("```\n    context.py    RunContext, Staged, StagedFile, Window (typed hand-offs)\n```",
     "context.py lists Window, which it does not define (defined in clinical_crm.engine.windows)"),
    ("```\n  engine/     runner.py (the steps), context.py (RunContext, Window), staging.py\n```",
     "context.py lists Window, which it does not define (defined in clinical_crm.engine.windows)"),
])
def test_the_check_finds_stale_names(line, problem):
    """The stale names of issue 19, and others of each kind, are found."""
    found = problems_of(ROOT / "README.md", text=line)
    assert any(problem in p for p in found), found


def test_the_check_leaves_what_it_should_not_check():
    """Placeholders, what runs create, URLs, API paths and names outside the repository pass."""
    text = ("`data/reports/<connection>/` `test-artifacts/console.png` `http://localhost:8080` "
            "`GET /api/v2/backfills` `../shared/REFERENCE.md` `apache/airflow:3.3.2-python3.11` "
            "`include/clinical_crm_connection.egg-info` `airflow.sdk.DAG` [docs](operations.md#x)")
    assert problems_of(ROOT / "docs" / "pipeline.md", text=text) == []
