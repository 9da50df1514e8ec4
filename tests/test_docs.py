"""Every table a document embeds from `python -m sd_vram.formula.report` is what the code prints now."""

import pathlib

import pytest

from sd_vram.formula import report

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [p for p in [ROOT / "README.md", ROOT / "formula" / "DERIVATION.md", *sorted((ROOT / "docs").glob("*.md"))]
        if p.exists() and "<!-- report:" in p.read_text(encoding="utf-8")]


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_report_blocks_are_current(doc, monkeypatch):
    monkeypatch.chdir(ROOT)  # report commands name archives relative to the repository
    text = doc.read_text(encoding="utf-8")
    blocks = list(report.BLOCK.finditer(text))
    assert blocks, "no report block"
    for m in blocks:
        expected = report.run(m.group(2).split())
        assert m.group(3).rstrip("\n") == expected, (
            f"{doc.name}: block `{m.group(2)}` is stale; run python -m sd_vram.formula.report --update {doc}")
