"""The package layout holds: every module imports alone, dependencies point one way, no cycles.

Layers, lowest first (README, "How the code is organised"): a module imports only from its own
package and from lower layers, at module level and inside functions alike.
"""
import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "clipforge"
LAYERS = [
    {"runtime", "files", "_version"},
    {"models", "tokenizer", "transforms", "distributed"},
    {"data", "loss", "checkpoints"},
    {"evaluate"},
    {"train", "search", "export"},  # evaluation while training, search and int8 reports use evaluate's encoders
    {"demo"},
    {"cli"},
    {"__main__"},  # python -m clipforge: the command itself
]
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}
# The one import that points up, lazily: clipforge.load hands an export folder (onnx_export.json) to
# the ONNX runtime model that reads it. export never imports checkpoints, so there is no cycle.
ALLOWED_UPWARD = {("clipforge.checkpoints.read", "clipforge.export")}


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__main__":  # a script: running it is its import
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _unit(module: str) -> str:
    """The top-level unit a module belongs to: ``clipforge.train.loop`` -> ``train``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, module: str) -> set[str]:
    """Every clipforge module ``path`` imports, at module level or inside functions."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("clipforge")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("clipforge"):
                submodules = {f"{target}.{alias.name}" for alias in node.names if _is_module(f"{target}.{alias.name}")}
                found |= submodules or {target}
    return found


def _is_module(name: str) -> bool:
    path = SRC / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@pytest.mark.slow
def test_every_module_imports_alone():
    """Each module is imported with no other clipforge module loaded first (a fresh import each time)."""
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {_modules()!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'clipforge' or m.startswith('clipforge.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc().strip().splitlines()[-1])\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=SRC.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dependencies_point_one_way():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        unit = _unit(module)
        if unit == "":  # clipforge/__init__.py: the public API re-exports every layer
            continue
        assert unit in LAYER_OF, f"{module}: top-level unit {unit!r} has no layer in LAYERS"
        for target in _imports(path, module):
            other = _unit(target)
            if other == "":
                wrong.append(f"{module} imports the top-level clipforge package; import the module itself")
            elif other != unit and LAYER_OF[other] >= LAYER_OF[unit] and (module, target) not in ALLOWED_UPWARD:
                wrong.append(f"{module} (layer {LAYER_OF[unit]}) imports {target} (layer {LAYER_OF[other]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle_between_modules():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = {t for t in _imports(path, module) if t != module}
    for node in graph:  # a module reaching its own package's __init__ is Python's normal start-up order
        graph[node] = {t for t in graph[node] if not node.startswith(t + ".")}
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in graph.get(node, ()):
            if state.get(target) == "open":
                cycle.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycle, "import cycles: " + "; ".join(" -> ".join(c) for c in cycle)


def test_nothing_outside_cli_imports_argparse():
    users = [str(path.relative_to(SRC)) for path in PACKAGE.rglob("*.py")
             if "cli" not in path.relative_to(PACKAGE).parts and "argparse" in {
                 alias.name for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Import) for alias in node.names}]
    assert not users


def test_package_data_globs_match_files_and_cover_every_data_file():
    config = tomllib.loads((SRC.parent / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["clipforge"]
    matched = set()
    for pattern in globs:
        files = {p for p in PACKAGE.glob(pattern) if p.is_file()}
        assert files, f"package-data glob {pattern!r} matches no file"
        matched |= files
    data_files = {p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
                  and "__pycache__" not in p.parts}
    assert data_files <= matched, f"not installed: {sorted(str(p) for p in data_files - matched)}"


@pytest.mark.parametrize("limit", [450])
def test_files_stay_short(limit):
    long = [f"{p.relative_to(SRC)}: {n}" for p in PACKAGE.rglob("*.py")
            if p.name != "_ftfy_anchors.py" and (n := len(p.read_text().splitlines())) > limit]
    assert not long


def test_the_repository_tracks_no_run_outputs():
    """Run folders (checkpoints, curves, results) belong in runs/ or a temporary folder, never in git;
    weights are tracked only as test fixtures, each under 4 MB."""
    listed = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=SRC.parent)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = [SRC.parent / line for line in listed.stdout.splitlines()]
    top_level = {p.relative_to(SRC.parent).parts[0] for p in tracked}
    assert top_level <= {".ci", ".gitignore", "LICENSE", "README.md", "benchmarks", "pyproject.toml",
                         "src", "tests", "tools"}, sorted(top_level)
    stray = [str(p) for p in tracked if p.name in ("results.json", "metrics.jsonl", "state.pt")
             or (p.suffix in (".safetensors", ".pt", ".onnx") and "fixtures" not in p.parts)]
    assert not stray
    large = [str(p) for p in tracked if p.exists() and p.stat().st_size > 4 * 2**20]
    assert not large
