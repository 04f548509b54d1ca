"""The documentation's proofs exist: every test MIGRATION.md cites for a TF -> PyTorch mapping, and every test
file the README names, is in the test suite under that name."""

from __future__ import annotations

import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "parity_tests"


@functools.cache
def _defined_tests(module: str) -> frozenset[str]:
    path = TESTS / f"{module}.py"
    assert path.exists(), f"{path.name} is cited but does not exist"
    return frozenset(re.findall(r"^def (test_\w+)\(", path.read_text(), flags=re.M))


def _cited_tests(cell: str) -> list[tuple[str, str]]:
    """(module, test) pairs of a table cell: `test_file::test_name`, and `::test_name` for the same file again
    (a `[param]` suffix names cases of a parametrized test)."""
    cited, module = [], None
    for match in re.finditer(r"(test_\w+)?::(test_\w+)", cell):
        module = match.group(1) or module
        assert module is not None, f"'::{match.group(2)}' without a test file before it in: {cell}"
        cited.append((module, match.group(2)))
    return cited


def test_cited_test_parser_reads_continuations():
    cell = "test_a::test_one, ::test_two[x-*]; test_b::test_three (a note)"
    assert _cited_tests(cell) == [("test_a", "test_one"), ("test_a", "test_two"), ("test_b", "test_three")]


def test_every_migration_row_cites_tests_that_exist():
    rows = [line for line in (ROOT / "MIGRATION.md").read_text().splitlines()
            if line.startswith("|") and not set(line) <= set("|- ")]
    header, body = rows[0], rows[1:]
    assert header.split("|")[-2].strip().lower().startswith("test"), f"last column is not the tests: {header}"
    assert len(body) >= 25
    missing = []
    for row in body:
        cited = _cited_tests(row.split("|")[-2])
        assert cited, f"a MIGRATION.md row cites no test: {row[:120]}"
        missing += [f"{module}::{name}" for module, name in cited if name not in _defined_tests(module)]
    assert not missing, f"MIGRATION.md cites tests that do not exist: {missing}"


def test_test_files_named_in_the_readme_exist():
    named = set(re.findall(r"parity_tests/(test_\w+)\.py", (ROOT / "README.md").read_text()))
    assert named, "the README names no test file"
    assert not [name for name in sorted(named) if not (TESTS / f"{name}.py").exists()]


def test_readme_python_api_runs_as_written(tf, tmp_path):
    """The README's "Python API" block, run verbatim in a fresh process: it transfers both ways, writes the .npz and
    finds no diverging layer between the two models it built."""
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code += "assert first_divergence(result['layers']) is None and len(result['layers']) == 10, result\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "cnn.npz").exists()
