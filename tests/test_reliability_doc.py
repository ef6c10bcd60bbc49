"""docs/reliability.md stays true: every test it cites exists, every reliability test is cited, and
its totals line is computed from the tables."""

from __future__ import annotations

import ast
import re

from bad_adapters import CASES
from testing_utils import REPO_ROOT

DOC = REPO_ROOT / "docs" / "reliability.md"


def _tests_in(module: str) -> set[str]:
    tree = ast.parse((REPO_ROOT / "tests" / module).read_text())
    return {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def _cited() -> list[tuple[str, str]]:
    return re.findall(r"`tests/(test_\w+\.py)::(test_\w+)(?:\[[^\]]*\])?`", DOC.read_text())


def totals_line(text: str) -> str:
    """One line counting the rows of every table of cases (gallery, clients, crashes, Hub)."""
    rows = len(re.findall(r"^\| (?!#|case|kill point|fault|---)", text, flags=re.M))
    return f"Totals: {rows} cases tried ({len(CASES)} bad adapters, {rows - len(CASES)} client, crash and Hub faults), all with the expected outcome in the test suite."


def test_every_cited_test_exists():
    for module, name in _cited():
        assert name in _tests_in(module), f"docs/reliability.md cites missing {module}::{name}"


def test_every_screening_and_crash_test_is_cited():
    cited = {name for _, name in _cited()}
    for module in ("test_screening.py", "test_recipe_reliability.py"):
        missing = sorted(_tests_in(module) - cited)
        assert not missing, f"add these {module} tests to docs/reliability.md: {missing}"


def test_totals_are_current():
    text = DOC.read_text()
    section = re.search(r"<!-- totals:start -->\n(.*)\n<!-- totals:end -->", text)
    assert section and section.group(1) == totals_line(text), f"expected: {totals_line(text)}"
