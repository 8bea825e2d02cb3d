"""Every reference in the code, the tests, the notebooks, the README and the docs points at something
that exists.

Scanned: ``workbench/**/*.py``, ``tests/**/*.py``, ``notebooks/*.ipynb`` (every cell's source),
``README.md``, ``docs/*.md`` and ``bench/*.py``. Three checks, each failing with ``file:line`` and the
bad reference:

- **no references to documents that are not in the repository**: the old design document, the peers
  report, the numbered objective catalogue (the catalogue by itself or with a section number; the
  repository's ``docs/objectives.md`` is generated, with one ``## <objective>`` section per objective
  and no numbers) and numbered development issues;
- **headings and anchors resolve**: ``docs/<file>.md, "<Heading>"`` needs a ``## <Heading>`` line in
  that file (case-sensitive, whitespace inside the quotes normalised, so a heading may wrap in a
  docstring); ``docs/<file>.md#<anchor>`` and a markdown file's own ``](#<anchor>)`` links need a
  heading whose GitHub anchor is ``<anchor>`` (for ``docs/objectives.md``: a ``## <objective>``
  section);
- **mentioned paths exist**: every ``workbench/<path>.py``, ``notebooks/<name>.ipynb`` and
  ``docs/<name>.md`` (placeholders such as ``<name>`` are not paths).

``test_the_scanner_finds_each_kind_of_bad_reference`` checks the detectors themselves on made-up text
(built by concatenation, so this file does not trip its own scan).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# documents that are not in the repository (the first two case-sensitive names, then the catalogue)
MISSING_DOCUMENTS = [
    (re.compile(r"DESIGN\.md"), "names a design document that does not exist (cite a section of docs/design.md)"),
    (re.compile(r"peers\.md", re.IGNORECASE), "names a peers report that does not exist (cite the upstream issues)"),
    (re.compile(r"(?<![\w/\"'])objectives\.md"),
     "names the numbered objective catalogue, which does not exist (cite the paper or docs/objectives.md#<name>)"),
    (re.compile(r"objectives\.md[,:]?\s*(?:§|sections?\b|\d)"),
     "names a numbered section; docs/objectives.md has one ## <objective> section each (docs/objectives.md#<name>)"),
    (re.compile(r"\bissues? \d+\b", re.IGNORECASE),
     "names a numbered development issue (say what it is instead; upstream issues are cited as project #N)"),
]
HEADING_REF = re.compile(r"docs/([\w.-]+\.md),\s*\\?\"([^\"\\]+)\\?\"")
ANCHOR_REF = re.compile(r"docs/([\w.-]+\.md)#([\w-]+)")
LOCAL_ANCHOR = re.compile(r"\]\(#([\w-]+)\)")
PATHS = [re.compile(r"(?<![\w/.-])workbench/[\w/-]+\.py(?!\w)"),
         re.compile(r"(?<![\w/.-])notebooks/[\w/-]+\.ipynb(?!\w)"),
         re.compile(r"(?<![\w/.-])docs/[\w/-]+\.md(?!\w)")]


def scanned_files() -> list[Path]:
    files = sorted((ROOT / "workbench").rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py"))
    files += sorted((ROOT / "notebooks").glob("*.ipynb")) + [ROOT / "README.md"]
    files += sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "bench").glob("*.py"))
    return [f for f in files if f.is_file()]


def texts(path: Path) -> list[tuple[str, str]]:
    """(location prefix, text) pieces of a file: the whole file, or one piece per notebook cell."""
    rel = path.relative_to(ROOT).as_posix()
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return [(f"{rel}:cell {i}:", "".join(c["source"])) for i, c in enumerate(cells)]
    return [(f"{rel}:", path.read_text(encoding="utf-8"))]


def _where(prefix: str, text: str, start: int) -> str:
    return f"{prefix}{text.count(chr(10), 0, start) + 1}"


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@lru_cache(maxsize=None)
def headings(doc: str) -> tuple[frozenset[str], frozenset[str]] | None:
    """(the ``## `` headings, the anchors of every heading) of ``docs/<doc>``; None if it does not exist."""
    path = ROOT / "docs" / doc
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    level2 = frozenset(ln[3:].strip() for ln in lines if ln.startswith("## "))
    anchors = frozenset(anchor(m.group(2)) for ln in lines if (m := re.match(r"(#{1,6}) (.+)", ln)))
    return level2, anchors


def bad_document_references(prefix: str, text: str) -> list[str]:
    """One problem per offending place (the first pattern that matches there), in file order."""
    found: dict[int, str] = {}
    for pattern, why in MISSING_DOCUMENTS:
        for m in pattern.finditer(text):
            found.setdefault(m.start(), f"{_where(prefix, text, m.start())}: {m.group(0)!r} {why}")
    return [found[k] for k in sorted(found)]


def bad_heading_references(prefix: str, text: str, own_doc: str | None = None) -> list[str]:
    out = []
    for m in HEADING_REF.finditer(text):
        doc, heading = m.group(1), " ".join(re.sub(r"\n\s*#", " ", m.group(2)).split())
        found = headings(doc)
        if found is None:
            out.append(f"{_where(prefix, text, m.start())}: 'docs/{doc}' does not exist")
        elif heading not in found[0]:
            out.append(f"{_where(prefix, text, m.start())}: 'docs/{doc}, \"{heading}\"': no '## {heading}' "
                       f"in docs/{doc} (its sections: {', '.join(sorted(found[0]))})")
    refs = [(m, m.group(1), m.group(2)) for m in ANCHOR_REF.finditer(text)]
    if own_doc is not None:
        refs += [(m, own_doc, m.group(1)) for m in LOCAL_ANCHOR.finditer(text)]
    for m, doc, name in refs:
        found = headings(doc)
        if found is None:
            out.append(f"{_where(prefix, text, m.start())}: 'docs/{doc}' does not exist")
        elif name not in found[1]:
            out.append(f"{_where(prefix, text, m.start())}: 'docs/{doc}#{name}': no heading with that anchor "
                       f"in docs/{doc}")
    return out


def missing_paths(prefix: str, text: str) -> list[str]:
    return [f"{_where(prefix, text, m.start())}: {m.group(0)!r} does not exist"
            for pattern in PATHS for m in pattern.finditer(text) if not (ROOT / m.group(0)).exists()]


def _scan(check) -> list[str]:
    problems = []
    for path in scanned_files():
        own = path.name if path.parent == ROOT / "docs" else None
        for prefix, text in texts(path):
            problems += check(prefix, text, own)
    return problems


def _report(problems: list[str], what: str) -> str:
    return f"{len(problems)} {what}:\n" + "\n".join(problems)


def test_the_scanned_files_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in scanned_files()}
    assert {"README.md", "docs/design.md", "docs/objectives.md", "workbench/loop.py",
            "tests/test_docs_references.py"} <= names
    assert any(n.startswith("notebooks/") for n in names) and any(n.startswith("bench/") for n in names)


def test_no_reference_to_a_document_that_does_not_exist():
    problems = _scan(lambda prefix, text, own: bad_document_references(prefix, text))
    assert not problems, _report(problems, "references to documents or sections that do not exist")


def test_heading_and_anchor_references_resolve():
    problems = _scan(bad_heading_references)
    assert not problems, _report(problems, "references to headings or anchors that do not exist")


def test_every_mentioned_path_exists():
    problems = _scan(lambda prefix, text, own: missing_paths(prefix, text))
    assert not problems, _report(problems, "mentioned paths that do not exist")


def test_the_scanner_finds_each_kind_of_bad_reference():
    design = "docs/" + "design.md"
    bad = "\n".join([
        "see " + "DESIGN" + ".md section 4", "see " + "peers" + ".md", "formula: " + "objectives" + ".md 2.16",
        "in docs/" + "objectives" + ".md section 5", "the statements of " + "issue" + " 6",
        design + ', "No Such Heading"', design + ', "The\n    loop"', "docs/" + "objectives.md#no_such_objective",
        "docs/" + "objectives.md#m2po", "workbench/" + "no_such_module.py", "notebooks/" + "99_missing.ipynb",
        "workbench/" + "loop.py", "workbench/steps/reweight/<module>.py", "TRL #3120",
    ])
    docs = bad_document_references("x:", bad)
    assert [d.split(":")[1] for d in docs] == ["1", "2", "3", "4", "5"], docs
    heads = bad_heading_references("x:", bad)
    assert len(heads) == 2 and "No Such Heading" in heads[0] and "no_such_objective" in heads[1], heads
    paths = missing_paths("x:", bad)
    assert len(paths) == 2 and "no_such_module.py" in paths[0] and "99_missing.ipynb" in paths[1], paths
    assert missing_paths("x:", "in /abs/workbench/" + "nothing.py or src/workbench/" + "nothing.py") == []
    assert anchor("Staleness and the behaviour policy") == "staleness-and-the-behaviour-policy"
    assert anchor("gspo_token") == "gspo_token" and anchor("The Rollouts contract") == "the-rollouts-contract"
