"""The house rules, read from the code itself (ast): layers, no import circles, short functions, a true map.

- flywheel/data, flywheel/models.py and flywheel/posttrain take resolved references: none of them imports
  flywheel/world (function-local imports count: a lazy import is still an arrow up the layers);
- no import circle inside flywheel/ (imports under `if TYPE_CHECKING:` do not run, so they do not count);
- no function in flywheel/ or flows/ is longer than 60 lines (decorators excluded);
- docs/DESIGN.md's layout names every source file and folder that exists, and nothing that does not.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
BELOW_THE_WORLD = ("flywheel.data", "flywheel.models", "flywheel.posttrain")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / "flywheel").rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside `if TYPE_CHECKING:` blocks (their imports never run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The flywheel modules `path` imports anywhere in its body (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    out: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: imports_of(path, known) - {name} for name, path in mods.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def long_functions(paths: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def _source_files() -> list[Path]:
    return sorted([*(ROOT / "flywheel").rglob("*.py"), *(ROOT / "flows").rglob("*.py")])


def test_data_models_and_posttrain_never_import_the_world():
    graph = import_graph()
    upward = sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets
                    if m.startswith(BELOW_THE_WORLD) and t.startswith("flywheel.world"))
    assert upward == []


def test_no_import_circle_inside_flywheel():
    assert circles(import_graph()) == []


def test_no_function_in_flywheel_or_flows_is_longer_than_sixty_lines():
    assert long_functions(_source_files()) == []


def test_the_checks_themselves_can_fail(tmp_path):
    """A circle, an upward arrow and a long function written here are each found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from flywheel.b import g\n")
    b.write_text("from typing import TYPE_CHECKING\nimport flywheel.a\nif TYPE_CHECKING:\n    import flywheel.c\n")
    known = {"flywheel.a", "flywheel.b", "flywheel.c"}
    graph = {"flywheel.a": imports_of(a, known), "flywheel.b": imports_of(b, known)}
    assert graph == {"flywheel.a": {"flywheel.b"}, "flywheel.b": {"flywheel.a"}}
    assert circles(graph) == [["flywheel.a", "flywheel.b"]]
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * 60)
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert long_functions([long]) == ["long.py:1 f (61 lines)"]
    finally:
        ROOT = saved


# --- docs/DESIGN.md's layout against the tree ---------------------------------------------------------

NAME = re.compile(r"^(?P<indent> *)(?P<names>[\w./-]+(?:, [\w./-]+)*)(?:  |$)")
MAPPED = ("flywheel", "flows")  # the layout must list every file of these folders
DESCRIPTION_COLUMN = 20  # a line indented this far continues the description above it


def design_layout(text: str) -> set[str]:
    """Paths named in DESIGN.md's Layout block: one entry a line, children indented two spaces under a folder."""
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    paths: set[str] = set()
    parents: list[tuple[int, str]] = []  # (indent, folder path) of the open folders
    for line in block.splitlines():
        m = NAME.match(line)
        if not m or not line.strip() or len(m["indent"]) >= DESCRIPTION_COLUMN:
            continue
        indent = len(m["indent"])
        while parents and parents[-1][0] >= indent:
            parents.pop()
        prefix = parents[-1][1] if parents else ""
        for name in m["names"].split(", "):
            path = prefix + name
            paths.add(path.rstrip("/"))
            if name.endswith("/"):
                parents.append((indent, path))
    return paths


def tree_entries() -> set[str]:
    out: set[str] = set()
    for top in MAPPED:
        for p in (ROOT / top).rglob("*"):
            rel = p.relative_to(ROOT)
            if "__pycache__" in rel.parts or p.name == "__init__.py" or "tasks" in rel.parts[2:3]:
                continue  # evaluation/tasks/ holds data files, named as one folder
            if p.is_dir() or p.suffix in (".py", ".env"):
                out.add(str(rel))
    return out


def test_design_layout_names_every_file_and_only_files_that_exist():
    listed = design_layout((ROOT / "docs" / "DESIGN.md").read_text())
    in_scope = {p for p in listed if p.split("/")[0] in MAPPED}
    assert sorted(tree_entries() - in_scope) == [], "in the tree, missing from docs/DESIGN.md's layout"
    assert sorted(p for p in listed if not (ROOT / p).exists()) == [], "in docs/DESIGN.md's layout, not in the tree"


def test_design_layout_reads_nested_folders_and_lists():
    text = "## Layout\n\n```\nREADME.md           the two commands\nflywheel/           the library\n" \
           "  a.py, b.py        two files\n  round/            a package\n    plan.py         the plan\n" \
           "                    continued, description\n  c.py              back one level\n" \
           "flows/              Prefect\n```\n"
    assert design_layout(text) == {"README.md", "flywheel", "flywheel/a.py", "flywheel/b.py", "flywheel/round",
                                   "flywheel/round/plan.py", "flywheel/c.py", "flows"}
