"""The walkthroughs in notebooks/ stay runnable without running them (the run itself is the
``slow`` test ``tests/integration/test_notebooks.py``): each notebook is valid, every code
cell compiles, every import resolves (a renamed function fails here), and every config file
a cell names exists."""

from __future__ import annotations

import ast
import re

import pytest

from cellfoundry.paths import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CONFIG_REF = re.compile(r'CONFIGS\s*/\s*"([^"]+)"\s*/\s*"([^"]+)"')


def _code_cells(path):  # type: ignore[no-untyped-def]
    import nbformat

    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    return ["".join(c.source) for c in book.cells if c.cell_type == "code"]


def test_the_walkthroughs_are_numbered_in_order() -> None:
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_cells_compile_imports_resolve_and_configs_exist(path) -> None:  # type: ignore[no-untyped-def]
    sources = _code_cells(path)
    assert sources, f"{path.name} has no code"
    configs = []
    for i, source in enumerate(sources):
        tree = ast.parse(source, filename=f"{path.name}[cell {i}]")  # a SyntaxError names it
        imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        # only the imports run: they name the API the walkthrough calls
        exec(compile(ast.Module(body=imports, type_ignores=[]), path.name, "exec"), {})
        configs += CONFIG_REF.findall(source)
    for stage, name in configs:
        assert (REPO_ROOT / "jobs" / "configs" / stage / name).is_file(), (path.name, stage, name)
