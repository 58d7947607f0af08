"""The docs as a map of the code: the code map in docs/design.md names every module and only modules that
exist, no document points outside the repository, the README stays an entrance (<= 150 lines), and every
relative link in README.md and docs/*.md lands on a file.

Plain text checks, no imports of niyama: a second or so.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "niyama"
DESIGN = ROOT / "docs" / "design.md"
README = ROOT / "README.md"
MAX_README_LINES = 150


def code_map() -> tuple[set[str], set[str]]:
    """The files and folders the code map's tree names, as paths from the repository root ("niyama/kv.py",
    "niyama/server/"). The tree is the fenced block of docs/design.md that starts with `niyama/`. An entry is
    a line whose first word ends in `.py` or `/`, indented two spaces per level under its folder; a line
    indented deeper than one level below the current folder continues the description above it."""
    text = DESIGN.read_text(encoding="utf-8")
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    trees = [b for b in blocks if b.startswith("niyama/")]
    assert trees, "docs/design.md has no code map: a fenced block whose first line is `niyama/`"
    files, folders = set(), set()
    stack: list[str] = []
    for line in trees[0].splitlines():
        m = re.match(r"( *)(\S+)", line)
        if not m:
            continue
        indent, word = len(m[1]), m[2]
        if indent % 2 or not (word.endswith(".py") or word.endswith("/")):
            continue
        depth = indent // 2
        if depth > len(stack):          # a description's continuation line
            continue
        del stack[depth:]
        path = "".join(stack) + word
        if word.endswith("/"):
            stack.append(word)
            folders.add(path)
        else:
            files.add(path)
    return files, folders


def modules() -> set[str]:
    """Every module file of the package, from the repository root; __init__.py and __main__.py need no entry."""
    return {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
            if p.name not in ("__init__.py", "__main__.py") and "__pycache__" not in p.parts}


def test_code_map_names_every_module():
    files, _ = code_map()
    missing = sorted(modules() - files)
    assert not missing, ("docs/design.md's code map does not name these modules (add a line for each under its "
                         "package's heading, with what it holds): " + ", ".join(missing))


def test_code_map_names_only_what_exists():
    files, folders = code_map()
    gone = sorted(f for f in files | folders if f.startswith("niyama/") and not (ROOT / f).exists())
    assert not gone, ("docs/design.md's code map names modules or folders that do not exist under niyama/ "
                      "(renamed or removed? fix or drop their lines): " + ", ".join(gone))


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


OUTSIDE = re.compile(r"\b(?:DESIGN|SPEC|STYLE)\.md\b|(?<![\w./-])shared/[\w.-][\w./-]*")


def test_no_document_points_outside_the_repository():
    texts = [*doc_files(), *sorted((ROOT / "docs").rglob("*/*.md")), *sorted(PACKAGE.rglob("*.py"))]
    hits = []
    for path in texts:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in OUTSIDE.finditer(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {m.group(0)!r} in {line.strip()[:100]!r}")
    assert not hits, ("these lines refer to documents outside the repository (DESIGN.md, SPEC.md, STYLE.md or a "
                      "shared/ path); say what they say here instead:\n" + "\n".join(hits))


def test_readme_is_an_entrance_not_the_manual():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, (f"README.md has {n} lines, more than {MAX_README_LINES}: move the detail "
                                   "into docs/ and link it")


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)


def relative_links(text: str) -> list[str]:
    """Targets of markdown links and link definitions, outside code (fenced blocks and `spans`), that are
    not URLs or in-page anchors."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = LINK.findall(text) + REFERENCE.findall(text)
    return [t for t in targets if not re.match(r"[a-zA-Z][\w+.-]*:|#", t)]


def test_every_relative_link_lands_on_a_file():
    broken = []
    for doc in doc_files():
        for target in relative_links(doc.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0]
            if not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(ROOT)}: ({target}) -> {(doc.parent / path).resolve()} "
                              "does not exist")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_the_checks_find_what_they_look_for():
    """The parsers themselves: a tree with a continuation line, links inside and outside code."""
    assert relative_links("[a](docs/x.md) `[b](y.md)` [c](https://e.org) [d](#top)\n```\n[e](z.md)\n```\n"
                          "[f]: ../g.md\n") == ["docs/x.md", "../g.md"]
    assert OUTSIDE.search("see shared/SPEC.md") and OUTSIDE.search("the DESIGN.md rule")
    assert not OUTSIDE.search("a shared pool, shared:10") and not OUTSIDE.search("docs/design.md")
