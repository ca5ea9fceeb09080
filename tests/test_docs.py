"""The lessons rendered to HTML with nbconvert, as a reader without Quarto gets them (no network at render time).

Every figure a lesson stores must land in its page, and its math and tables must reach the page as math and tables.
`GAT_DOCS_OUT=folder pytest tests/test_docs.py` also writes the pages there, to open in a browser (index.html is the
home page, 00_data.html the first lesson)
(the docs site itself is built by Quarto: `nbdev-preview`, or the deploy workflow).
"""
import os
from pathlib import Path

import nbformat
import pytest
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
FIGURE_TYPES = ("image/png", "image/jpeg", "image/svg+xml")


def stored_figures(nb) -> int:
    "How many figures the notebook's stored outputs hold."
    return sum(any(t in out.get("data", {}) for t in FIGURE_TYPES) for c in nb.cells if c.cell_type == "code"
               for out in c.get("outputs", []))


def page_figures(page: str) -> int:
    return page.count('src="data:image/png;base64,') + page.count('src="data:image/jpeg;base64,') + page.count("<svg")


@pytest.fixture(scope="module")
def exporter():
    return HTMLExporter(template_name="lab")


@pytest.fixture(scope="module")
def template_figures(exporter):
    "Images the page template carries itself (its logo), found on the page of an empty notebook."
    return page_figures(exporter.from_notebook_node(nbformat.v4.new_notebook())[0])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_lesson_page_holds_its_figures_math_and_tables(path, exporter, template_figures):
    nb = nbformat.read(path, as_version=4)
    page, _ = exporter.from_notebook_node(nb)
    shown = page_figures(page) - template_figures
    assert shown == stored_figures(nb), f"{path.name}: {stored_figures(nb)} figures stored, {shown} on the page"
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    if "$" in markdown: assert "MathJax" in page, f"{path.name}: math but no MathJax on the page"
    if "\n|---" in markdown or "\n| ---" in markdown: assert "<table" in page, f"{path.name}: a table lost in rendering"
    if out := os.environ.get("GAT_DOCS_OUT"):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{path.stem}.html").write_text(page)


def test_the_course_has_figures():
    "The check above can fail: the lessons store figures, so a renderer that drops them all is caught."
    assert sum(stored_figures(nbformat.read(p, as_version=4)) for p in NOTEBOOKS) > 20
