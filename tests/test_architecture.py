"""The house rules that keep the package easy to live in: no import cycles (imports inside functions
count), files of a readable size, and merging adapters without the recipes' dependencies."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "hf_fedlora"
SIZE_LIMITS = {"hf_fedlora": 450, "recipes": 450, "benchmarks": 500}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every hf_fedlora module that ``path`` imports anywhere in its body, with the packages above the
    target (importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
            # a package above the importing module is already loading: only an explicit read of it counts
            found.update(p for p in prefixes if p in modules and (p == target or p not in ancestors))
    found.discard(name)
    return found


def _import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: _imports(path, modules) for name, path in files.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules, or ``None`` (iterative DFS, three colours)."""
    colour = dict.fromkeys(graph, 0)
    for root in sorted(graph):
        if colour[root]:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif colour.get(child) == 0:
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_cycle_finder_finds_a_cycle_through_a_function_level_import():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_package_modules():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_lower_layers_do_not_import_upper_ones():
    graph = _import_graph()
    forbidden = {
        "hf_fedlora.adapters": (
            "hf_fedlora.aggregation",
            "hf_fedlora.federation",
            "hf_fedlora.flower",
            "hf_fedlora.cli",
        ),
        "hf_fedlora.strategies": ("hf_fedlora.adapters", "hf_fedlora.aggregation", "hf_fedlora.federation"),
        "hf_fedlora.aggregation": ("hf_fedlora.federation", "hf_fedlora.flower", "hf_fedlora.hub"),
        "hf_fedlora.federation": ("hf_fedlora.flower", "hf_fedlora.cli"),
        "hf_fedlora.hub": (
            "hf_fedlora.adapters",
            "hf_fedlora.aggregation",
            "hf_fedlora.federation",
            "hf_fedlora.cli",
        ),
    }
    wrong = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for layer, above in forbidden.items()
        if module == layer or module.startswith(layer + ".")
        for target in targets
        if target.startswith(above)
    ]
    assert not wrong, wrong


@pytest.mark.parametrize("folder", sorted(SIZE_LIMITS))
def test_files_stay_readable(folder):
    limit = SIZE_LIMITS[folder]
    too_long = {
        str(path.relative_to(REPO_ROOT)): n
        for path in (REPO_ROOT / folder).rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > limit
    }
    assert not too_long, f"files over {limit} lines: {too_long}"


def test_merging_adapters_needs_none_of_the_recipe_dependencies():
    """``pip install hf-fedlora`` (torch, safetensors, peft, huggingface_hub) is enough to merge: we load
    nothing beyond what ``import peft`` loads itself (peft pulls in transformers and accelerate)."""
    code = (
        "import sys\n"
        "import peft\n"
        "before = set(sys.modules)\n"
        "import hf_fedlora\n"
        "from hf_fedlora import LoraAdapter, aggregate_adapters\n"
        "import hf_fedlora.hub\n"
        "heavy = [m for m in ('datasets', 'evaluate', 'matplotlib', 'sklearn', 'scipy', 'accelerate', 'flwr')"
        " if m in sys.modules and m not in before]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"importing the merge API loaded {result.stdout.strip()}"
