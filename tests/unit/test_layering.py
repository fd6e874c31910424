"""Imports go one way: no cycle among the project's modules, and ``pipeline`` reaches ``actors`` only where a stage
starts its actors, inside the function that starts them. Modules, functions and lines stay within their size limits.
All read with the ast module, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "actors")

# The stage modules that start Ray actors, and the actor modules each one starts. Everything else in `pipeline`
# is pure or talks to running actors through handles it is given.
ACTOR_STARTERS = {
    "pipeline.generate": {"actors.engine"},  # the engine pool
    "pipeline.levels": {"actors.embedder"},  # the question-dedup embedder
    "pipeline.quality": {"actors.embedder"},  # the embedder for corpus quality metrics, when none is passed in
    "pipeline.train": {"actors.train_worker"},  # the Ray Train worker loop
}

# Size limits: lines per module, lines per function (decorators not counted), characters per line.
MODULE_LINES = 400
FUNCTION_LINES = 80
LINE_CHARS = 120
MODULE_LIMITED = ("pipeline",)
FUNCTION_LIMITED = ("pipeline", "actors", "cluster")
LINE_LIMITED = ("pipeline", "actors")


def _module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _imports(path: Path, modules: set[str]) -> list[tuple[str, bool]]:
    """``(project module, at module level)`` for every import in ``path``, lazy ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pipeline import chat` imports the module pipeline.chat; `from pipeline.x import f` imports x
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import pipeline.tasks.loaders.x` -> the longest known module
                name = name.rpartition(".")[0]
            if name:
                out.append((name, id(node) in top_level))
    return out


def _graph() -> dict[str, dict[str, bool]]:
    """module -> {imported project module: whether any import of it is at module level}."""
    files = _module_files()
    graph: dict[str, dict[str, bool]] = {}
    for module, path in files.items():
        edges = graph.setdefault(module, {})
        for target, eager in _imports(path, set(files)):
            if target != module:
                edges[target] = edges.get(target, False) or eager
    return graph


def _cycle(graph: dict[str, dict[str, bool]]) -> list[str] | None:
    """One import cycle as a module path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, {})):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_graph_sees_known_imports():
    graph = _graph()
    assert "pipeline.chat" in graph["pipeline.tokenization"]  # from pipeline.chat import ...
    assert "pipeline.tree" in graph["pipeline.generate"]  # from pipeline import chat, tree
    assert graph["pipeline.generate"]["actors.engine"] is False  # imported inside generate()


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_pipeline_imports_actors_only_where_it_starts_them():
    wrong = []
    for module, edges in sorted(_graph().items()):
        if not module.startswith("pipeline"):
            continue
        for target, eager in sorted(edges.items()):
            if target.partition(".")[0] != "actors":
                continue
            if target not in ACTOR_STARTERS.get(module, set()):
                wrong.append(f"{module} imports {target}")
            elif eager:
                wrong.append(f"{module} imports {target} at module level (import it where the actor is started)")
    assert wrong == []


def test_cycle_finder_on_a_known_graph():
    assert _cycle({"a": {"b": False}, "b": {"c": True}, "c": {}}) is None
    assert _cycle({"a": {"b": False}, "b": {"c": True}, "c": {"a": False}}) == ["a", "b", "c", "a"]


def _sources(packages: tuple[str, ...]) -> dict[str, str]:
    """Repository-relative path -> text of every Python file under ``packages``."""
    return {str(path.relative_to(REPO)): path.read_text(encoding="utf-8")
            for package in packages for path in sorted((REPO / package).rglob("*.py"))}


def _long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    """``(name, lines)`` of every function or method in ``source`` longer than ``limit`` lines."""
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= limit]


def test_modules_stay_short():
    long = {path: n for path, text in _sources(MODULE_LIMITED).items() if (n := len(text.splitlines())) > MODULE_LINES}
    assert long == {}, f"modules over {MODULE_LINES} lines: split them"


def test_functions_stay_short():
    long = {f"{path}:{name}": n for path, text in _sources(FUNCTION_LIMITED).items()
            for name, n in _long_functions(text, FUNCTION_LINES)}
    assert long == {}, f"functions over {FUNCTION_LINES} lines: give their parts names"


def test_lines_stay_short():
    long = [f"{path}:{i}" for path, text in _sources(LINE_LIMITED).items()
            for i, line in enumerate(text.splitlines(), 1) if len(line) > LINE_CHARS]
    assert long == [], f"lines over {LINE_CHARS} characters"


def test_size_checks_on_known_source():
    source = "def short():\n    return 1\n\n\ndef long():\n" + "    x = 1\n" * 80 + "    return x\n"
    assert _long_functions(source, 80) == [("long", 82)]
    assert _long_functions(source, 82) == []
