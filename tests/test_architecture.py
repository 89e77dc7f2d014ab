"""The package's layers (DESIGN.md §2) hold: import-linter's contracts, no import cycle, a Ray-free core."""

from __future__ import annotations

import subprocess
import sys

import grimp

from conftest import REPO_ROOT

PACKAGE = "lightreasoner_ray"


def test_import_linter_contracts_hold():
    # In a subprocess: import-linter configures logging, which would disable the package's loggers here.
    script = "import sys; from importlinter import cli; sys.exit(cli.lint_imports(config_filename='pyproject.toml'))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Contracts: 5 kept, 0 broken." in result.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), function-level imports included."""
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(module: str) -> None:
        # Iterative depth-first search: the package is deep enough to matter for recursion limits.
        work = [(module, iter(sorted(graph.find_modules_directly_imported_by(module))))]
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    return components


def test_no_import_cycle_among_the_package_modules():
    graph = grimp.build_graph(PACKAGE)  # every import statement, function-level ones too
    assert len(graph.modules) > 40
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for name in ("a", "b", "c", "d"):
        graph.add_module(name)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="c")
    graph.add_import(importer="c", imported="a")
    graph.add_import(importer="c", imported="d")
    assert _cycles(graph) == [["a", "b", "c"]]


BLOCKER = """
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'ray', 'deepspeed', 'vllm', 'pyarrow'}:
            raise ImportError(f'{name} is blocked: this machine has no Ray, DeepSpeed, vLLM or pyarrow')
sys.meta_path.insert(0, Blocked())
import pkgutil, importlib
import lightreasoner_ray.core, lightreasoner_ray.engines
names = []
for package in (lightreasoner_ray.core, lightreasoner_ray.engines):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):
        importlib.import_module(info.name)
        names.append(info.name)
import lightreasoner_ray.engines.base as base
from lightreasoner_ray.engine import EngineSpec, HFEngine, resolve_engine_factory
from lightreasoner_ray.core.contrast import contrast_positions
assert not {'ray', 'deepspeed', 'pyarrow'} & set(sys.modules), sorted(sys.modules)
print(len(names))
"""


def test_core_and_engines_import_without_ray_deepspeed_vllm_or_pyarrow():
    result = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip().splitlines()[-1]) >= 10  # every core and engines module was imported


def test_the_blocker_does_block_ray():
    script = BLOCKER.split("import pkgutil")[0] + "import ray\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "is blocked" in result.stderr


# Packages slow or optional enough that a module imports them inside the function that needs them.
HEAVY_PACKAGES = {"ray", "vllm", "deepspeed", "peft", "transformers", "torch", "datasets", "huggingface_hub",
                  "mlflow", "tensorboard", "wandb", "matplotlib", "sympy"}


def _module_files() -> dict:
    root = REPO_ROOT / PACKAGE
    return {".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__"): path
            for path in root.rglob("*.py")}


def _top_level_imports(path) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(inner, ast.Import):
                names |= {alias.name for alias in inner.names}
            elif isinstance(inner, ast.ImportFrom) and inner.module and not inner.level:
                names.add(inner.module)
    return names


def test_lazy_imports_of_the_package_only_defer_heavy_packages():
    """A function-level import of one of our modules is there to defer a heavy package that
    module imports at load (Ray, DeepSpeed, vLLM, torch, ...), or in the CLI's dispatch; never to
    hide a cycle."""
    import ast

    files = _module_files()

    def loads_heavy(module: str, seen: set[str]) -> bool:
        if module in seen or module not in files:
            return False
        seen.add(module)
        for name in _top_level_imports(files[module]):
            if name.split(".")[0] in HEAVY_PACKAGES or loads_heavy(name, seen):
                return True
        return False

    needless = []
    for module, path in files.items():
        if module == f"{PACKAGE}.cli":
            continue
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                    if not loads_heavy(node.module, set()):
                        needless.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports {node.module}")
    assert needless == []
