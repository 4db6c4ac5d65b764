"""The documentation: generated tables are current, the README stays a front door, relative links resolve."""
from __future__ import annotations

import importlib.util
import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def generator():
    spec = importlib.util.spec_from_file_location("docs_generate", REPO / "docs" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def markdown_files() -> list[Path]:
    return [REPO / "README.md"] + sorted((REPO / "docs").rglob("*.md"))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    text = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_marked_tables_are_current():
    stale = generator().stale_tables()
    assert not stale, f"tables differ from docs/generate.py's output (run `make docs`): {stale}"


def test_every_marker_names_a_known_table():
    gen = generator()
    for path in gen.doc_files():
        for m in gen.MARKER.finditer(path.read_text()):
            assert m.group(2) in gen.TABLES, f"{path.name}: unknown table {m.group(2)!r}"


def test_generator_reproduces_a_table_and_check_mode_writes_nothing(tmp_path, monkeypatch):
    gen = generator()
    doc = tmp_path / "x.md"
    doc.write_text("before\n<!-- table:gamma-star -->\nstale\n<!-- /table -->\nafter\n")
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "doc_files", lambda: [doc])
    assert gen.stale_tables() == ["x.md: gamma-star"]
    assert gen.main(["--check"]) == 1
    assert "stale" in doc.read_text()  # check mode rewrites nothing
    assert gen.main([]) == 0
    assert gen.stale_tables() == []
    assert doc.read_text().startswith("before\n<!-- table:gamma-star -->\n| batch |")


def test_readme_is_at_most_250_lines():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; keep it a front door (≤ 250) and move detail to docs/"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    text = FENCE.sub("", path.read_text())
    bad = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor})")
    assert not bad, f"{path.relative_to(REPO)}: broken links: {bad}"
