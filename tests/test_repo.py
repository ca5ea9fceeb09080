"Contracts of the repository itself: README and index agree, lessons map to modules, the library stays lean."
import json, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def index_markdown():
    cells = json.loads((ROOT / "nbs/index.ipynb").read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def test_readme_matches_index_notebook():
    "README.md is the index's text, with its links made relative to the repository root instead of nbs/."
    assert index_markdown().replace("](../", "](").strip() == (ROOT / "README.md").read_text().strip()


def test_pictures_resolve_from_where_they_are_read():
    for folder, text in ((ROOT / "nbs", index_markdown()), (ROOT, (ROOT / "README.md").read_text())):
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
        assert links and all((folder / link).is_file() for link in links), (folder, links)


def test_readme_has_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = {tag: re.search(rf"<!-- {tag} -->\n```bash\n(.+?)\n```", readme) for tag in ("setup", "test")}
    assert all(blocks.values()), "README.md needs a bash block after <!-- setup --> and after <!-- test -->"
    assert "pip install -e '.[dev]'" in blocks["setup"][1]
    assert "pytest" in blocks["test"][1] and "tests" in blocks["test"][1]
    assert (ROOT / "tests" / "test_notebooks.py").is_file()                        # the notebooks run under pytest


def test_one_lesson_one_module():
    stems = {re.sub(r"^\d+_", "", p.stem) for p in (ROOT / "nbs").glob("[0-9][0-9]_*.ipynb")}
    modules = {p.stem for p in (ROOT / "gat_tutorial").rglob("*.py")} - {"__init__", "_modidx"}
    exported = {_exports(nb).split(".")[-1] for nb in (ROOT / "nbs").glob("[0-9][0-9]_*.ipynb")}
    assert stems == exported, f"lessons whose name is not their module's: {sorted(stems ^ exported)}"
    assert modules <= stems, f"modules without a lesson of the same name: {sorted(modules - stems)}"


def _exports(nb):
    "The module a notebook exports (its `#| default_exp`), dotted under gat_tutorial."
    cells = json.loads(nb.read_text())["cells"]
    return next(re.search(r"#\| default_exp (\S+)", "".join(c["source"]))[1] for c in cells
                if "#| default_exp" in "".join(c["source"]))


def test_no_lesson_imports_a_later_one():
    "Lessons are numbered in teaching order: a notebook's code imports only modules of earlier lessons (issue 10)."
    lessons = sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb"))
    number = {_exports(nb): int(nb.name[:2]) for nb in lessons}
    later = []
    for nb in lessons:
        code = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
        for module in re.findall(r"(?:from|import) gat_tutorial\.([\w.]+)", code):
            if number.get(module, -1) > int(nb.name[:2]): later.append(f"{nb.name} imports {module} (lesson {number[module]:02d})")
    assert not later, later


def test_import_does_not_pull_in_jupyter_or_nbdev():
    mods = [".".join(p.relative_to(ROOT / "gat_tutorial").with_suffix("").parts) for p in (ROOT / "gat_tutorial").rglob("*.py")
            if not p.stem.startswith("_")]
    code = ("import sys\n" + "".join(f"import gat_tutorial.{m}\n" for m in mods) +
            "bad = [m for m in sys.modules if m.split('.')[0] in ('nbdev', 'jupyter', 'jupyterlab', 'IPython', 'ipykernel', 'execnb')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_wheel_ships_the_trained_weights(tmp_path):
    "A non-editable install finds data/ inside the package (gat_tutorial/data_files), as the lessons' DATA_DIR expects."
    import shutil, zipfile
    src = tmp_path / "src"; src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "gat_tutorial", "data"):
        if (ROOT / name).is_dir(): shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (ROOT / name).exists(): shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True)
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).namelist())
    shipped = {f"gat_tutorial/data_files/{p.relative_to(ROOT / 'data')}" for p in (ROOT / "data").rglob("*.safetensors")}
    assert shipped and shipped | {"gat_tutorial/data_files/digits_vae/config.json"} <= names, sorted(names)


def test_nbdev_workflows_test_and_deploy_the_docs():
    "GitHub runs nbdev's CI on every push and publishes the Quarto pages, as nbdev projects do."
    workflows = ROOT / ".github" / "workflows"
    assert "fastai/workflows/nbdev-ci@" in (workflows / "test.yaml").read_text()
    deploy = (workflows / "deploy.yaml").read_text()
    assert "fastai/workflows/quarto-ghp@" in deploy and "pages: write" in deploy


def test_every_lesson_gives_the_reader_something_to_try():
    "Each numbered lesson has a '## Try it' section (a knob to turn or a question with a cell to answer it)."
    for nb in sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        headings = [line for c in cells if c["cell_type"] == "markdown" for line in "".join(c["source"]).splitlines()]
        assert any(h.startswith("## Try it") for h in headings), f"{nb.name} has no '## Try it' section"
