"""The import graph of `promptehr_hf`, read from the source with `ast`: no cycle, no import of
the package's own modules inside a function (the usual way to dodge a cycle), and every import
in the direction of the data flow:

    file_utils -> datasets_scripts -> tokenization -> modeling_promptehr (config, model)
        -> modeling_promptehr.generation -> modeling_promptehr.training -> metrics -> promptehr_hf (API, CLI)

A module may import from its own layer or an earlier one; the one exception is training, whose
generation monitor and `promptehr train` use metrics. The remote-code files that travel with a
checkpoint import each other only, relatively (never `promptehr_hf`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "promptehr_hf"
FOLDERS = ("datasets_scripts", "tokenization", "modeling_promptehr", "metrics")
LAYERS = (  # longest prefix wins
    "promptehr_hf.file_utils",
    "promptehr_hf.datasets_scripts",
    "promptehr_hf.tokenization",
    "promptehr_hf.modeling_promptehr",
    "promptehr_hf.modeling_promptehr.generation",
    "promptehr_hf.modeling_promptehr.training",
    "promptehr_hf.metrics",
    "promptehr_hf",
)
ALLOWED_AGAINST_FLOW = {("promptehr_hf.modeling_promptehr.training", "promptehr_hf.metrics")}
REMOTE_CODE = ("configuration_promptehr", "modeling_promptehr", "tokenization_promptehr")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def package_files(root: Path) -> dict[str, Path]:
    files = {module_name(root, p): p for p in root.glob("*.py")}
    for folder in FOLDERS:
        files |= {module_name(root, p): p for p in (root / folder).rglob("*.py")}
    return files


def _layer(module: str) -> str:
    return max((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), key=len)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node: ast.stmt, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The package's own modules an import statement names (``from pkg import mod`` names mod)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        source = _resolve(node, module, is_package)
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
    else:
        return []
    return [n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_problems(root: Path) -> list[str]:
    """Every violation in the tree at ``root`` (a folder laid out like the repository)."""
    files = package_files(root)
    known = set(files)
    graph: dict[str, set[str]] = {m: set() for m in files}
    problems = []
    for module, path in sorted(files.items()):
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        top_level = {id(n) for n in tree.body}
        top_level |= {id(n) for t in tree.body if isinstance(t, ast.If) and _is_type_checking(t) for n in t.body}
        for node in ast.walk(tree):
            for target in _targets(node, module, is_package, known):
                where = f"{path.relative_to(root)}:{node.lineno}"
                if id(node) not in top_level:
                    problems.append(f"{where}: function-local import of {target}")
                if module.rsplit(".", 1)[-1] in REMOTE_CODE and not getattr(node, "level", 0):
                    problems.append(f"{where}: remote-code file imports {target}")
                a, b = _layer(module), _layer(target)
                if LAYERS.index(b) > LAYERS.index(a) and (a, b) not in ALLOWED_AGAINST_FLOW:
                    problems.append(f"{where}: {a} imports {target} ({b} comes later in the flow)")
                owner = target
                while owner not in known and "." in owner:
                    owner = owner.rsplit(".", 1)[0]
                if owner != module and owner in known:
                    graph[module].add(owner)
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [min(component)])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_imports_in_one_direction(repo_root):
    assert not import_problems(repo_root), "\n".join(import_problems(repo_root))


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in {"__init__.py": "", **{f"{f}/__init__.py": "" for f in FOLDERS}, **files}.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, expected", [
    ({"datasets_scripts/a.py": "from promptehr_hf.datasets_scripts import b\n",
      "datasets_scripts/b.py": "from . import a\n"}, "import cycle"),
    ({"datasets_scripts/a.py": "def f():\n    from promptehr_hf.metrics import report\n"}, "function-local import"),
    ({"datasets_scripts/a.py": "from promptehr_hf.tokenization.tok import T\n",
      "tokenization/tok.py": "T = 1\n"}, "comes later in the flow"),
    ({"modeling_promptehr/generation/g.py": "from ..training import t\n",
      "modeling_promptehr/training/t.py": ""}, "comes later in the flow"),
    ({"modeling_promptehr/generation/g.py": "from promptehr_hf.metrics.m import x\n",
      "metrics/m.py": "x = 1\n"}, "comes later in the flow"),
    ({"modeling_promptehr/modeling_promptehr.py": "from promptehr_hf.datasets_scripts import schema\n",
      "datasets_scripts/schema.py": ""}, "remote-code file imports"),
])
def test_the_checker_catches_each_kind_of_violation(tmp_path, files, expected):
    problems = import_problems(_tree(tmp_path, files))
    assert any(expected in p for p in problems), problems


def test_the_checker_allows_the_flow_and_the_training_exception(tmp_path):
    root = _tree(tmp_path, {
        "tokenization/tok.py": "from promptehr_hf.datasets_scripts import schema\n",
        "datasets_scripts/schema.py": "",
        "modeling_promptehr/training/t.py": "from promptehr_hf.metrics import m\nfrom ..generation import g\n",
        "modeling_promptehr/generation/g.py": "from ..modeling_promptehr import X\n",
        "modeling_promptehr/modeling_promptehr.py": "from .configuration_promptehr import C\n",
        "modeling_promptehr/configuration_promptehr.py": "",
        "metrics/m.py": "",
        "cli.py": "import importlib\n",
    })
    assert import_problems(root) == []


def test_public_api_is_lazy_and_every_name_resolves():
    import subprocess
    import sys

    code = ("import sys, promptehr_hf\n"
            "heavy = sorted({'torch', 'transformers', 'datasets'} & set(sys.modules))\n"
            "assert not heavy, f'import promptehr_hf imported {heavy}'\n"
            "for name in promptehr_hf.__all__:\n"
            "    getattr(promptehr_hf, name)\n"
            "from promptehr_hf import (PromptEHRConfig, PromptEHRForConditionalGeneration, PromptEHRTokenizer,\n"
            "                          PromptEHRTrainer, PromptEHRTrainingArguments, generate_patients)\n"
            "print(len(promptehr_hf.__all__))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 20
