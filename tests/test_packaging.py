"""No import name of this project may also belong to an installed distribution or to the standard library.

The modules live flat at the repository root, and every script here runs with its own folder first
on sys.path (train.py and eval.py from the root, bench/*.py from bench/, the tests from tests/ under
pytest). So each file or package name in those folders is an import name for as long as the program
runs, and it hides any installed module of the same name from everything in that process: that is
how a `kernels/` package here broke transformers 5, which imports Hugging Face's `kernels`
distribution. These tests name both sides of any such collision, so the next one is caught here and
not by a user.
"""

import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN_DISTRIBUTION = "masa-reference"  # pyproject.toml's [project] name; it installs no module


def project_import_names(root: Path = ROOT) -> dict[str, Path]:
    """Import name -> file or folder, for every module and package a program of this project can import
    by name: the .py files and packages at the root, in bench/ and in tests/, and those two folders
    themselves (importable from the root as namespace packages: `from bench import ...`)."""
    names: dict[str, Path] = {}
    for folder in (root, root / "bench", root / "tests"):
        for path in sorted(folder.iterdir()):
            if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
                names[path.stem] = path
    for folder in ("bench", "tests"):
        names[folder] = root / folder
    return names


def collisions(names: dict[str, Path], provided: dict[str, list[str]], root: Path = ROOT) -> list[str]:
    """One line per import name that another distribution also provides, naming both."""
    lines = []
    for name, path in sorted(names.items()):
        others = sorted(set(provided.get(name, ())) - {OWN_DISTRIBUTION})
        if others:
            lines.append(f"{path.relative_to(root)} (import name `{name}`) is also provided by the installed "
                         f"distribution(s) {', '.join(others)}")
    return lines


def test_the_scan_finds_the_project_modules():
    names = project_import_names()
    for expected in ("model", "rollout", "rewards", "masa", "train", "masa_kernels", "conftest", "sampler",
                     "bench"):
        assert expected in names, expected
    assert "__pycache__" not in names and "configs" not in names  # no __init__.py: not importable by name


def test_no_import_name_is_also_an_installed_distribution():
    clashes = collisions(project_import_names(), importlib.metadata.packages_distributions())
    assert not clashes, ("a module of this project would hide an installed one (or be hidden by it); rename "
                         "the project's file or package:\n  " + "\n  ".join(clashes))


def test_no_import_name_is_a_standard_library_module():
    shadowed = sorted(set(project_import_names()) & set(sys.stdlib_module_names))
    assert not shadowed, f"these names hide standard-library modules; rename them: {', '.join(shadowed)}"


def test_the_check_names_both_sides_of_a_collision(tmp_path):
    # The collision that broke transformers 5, rebuilt in a scratch tree: a top-level `kernels` package
    # next to an installed `kernels` distribution, and a module `config.py` next to a `config` one.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "config.py").write_text("")
    for folder in ("bench", "tests"):
        (tmp_path / folder).mkdir()
    provided = {"kernels": ["kernels"], "config": ["config", OWN_DISTRIBUTION], "model": [OWN_DISTRIBUTION]}
    lines = collisions(project_import_names(tmp_path), provided, tmp_path)
    assert lines == ["config.py (import name `config`) is also provided by the installed distribution(s) config",
                     "kernels (import name `kernels`) is also provided by the installed distribution(s) kernels"]


def project_imports(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its code (function-level imports too),
    over the modules at the root and the masa_kernels package (as one node)."""
    import ast

    files = {p.stem: [p] for p in root.glob("*.py")}
    files["masa_kernels"] = sorted((root / "masa_kernels").glob("*.py"))
    graph = {}
    for name, paths in files.items():
        deps = set()
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    deps |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    deps.add(node.module.split(".")[0])
        graph[name] = (deps & set(files)) - {name}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def test_imports_flow_one_way():
    graph = project_imports()
    assert {"train", "masa_step", "masa", "model", "rewards", "grader_pool"} <= set(graph)
    assert "masa_step" in graph["train"] and "hf_checkpoint" in graph["model"]
    assert import_cycle(graph) is None, f"an import circle: {' -> '.join(import_cycle(graph))}"


def test_the_cycle_check_finds_a_circle():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": set()}) is None
