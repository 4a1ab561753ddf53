"""The code's shape rules, checked on the source itself: short functions, and no module name used twice."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from conftest import ROOT

PACKAGES = ("job", "infra")
MAX_FUNCTION_LINES = 60  # a function longer than a screen is split by what it does


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")) + [ROOT / "fabfile.py"]


def test_no_function_in_job_or_infra_is_longer_than_a_screen():
    long = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_no_two_modules_share_a_name_across_packages():
    # job/launch.py beside infra/launch.py read as one thing and were two: a name says which side a module is on.
    seen = defaultdict(list)
    for path in sources():
        if path.name not in ("__init__.py", "__main__.py"):
            seen[path.stem].append(str(path.relative_to(ROOT)))
    assert {name: where for name, where in seen.items() if len(where) > 1} == {}


# ---- import layers ------------------------------------------------------------------------------------------
# Every import of a project module, at the top of a file or inside a function (a lazy import still ties the two
# modules together), except under `if TYPE_CHECKING:` (annotations only, never run). docs/design.md, "Import layers".

def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sources() + [ROOT / "train.py"]}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """The Import and ImportFrom nodes of a tree, leaving out the bodies of `if TYPE_CHECKING:`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = node.orelse
        todo.extend(children)


def imported_modules(name: str, path: Path, modules) -> set[str]:
    """The project modules `name` imports: `import a.b` and `from a.b import c` name a.b (or a.b.c where c is a
    module); a package stands for its __init__. A name outside the project (torch, json, ...) is left out."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def project(dotted: str) -> str | None:  # the longest project module the dotted name starts with
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {project(alias.name) for alias in node.names}
            continue
        base = node.module or ""
        if node.level:  # relative: from the package, up level - 1 packages
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            full = f"{base}.{alias.name}"
            found.add(full if full in modules else project(base))
    return found - {None, name}


def discovers_its_modules(path: Path) -> bool:
    """A package that imports every module in it when it is imported (`pkgutil.iter_modules(__path__)`)."""
    return path.name == "__init__.py" and any(
        isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "iter_modules"
        and any(getattr(arg, "id", None) == "__path__" for arg in node.args)
        for node in ast.walk(ast.parse(path.read_text(), str(path))))


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports. A package that discovers its modules (job.recipes, the recipes)
    imports each of them; a module so discovered importing its package back (for the base class it subclasses) is
    the plugin pattern, left out: the package is what runs it, so the package's arrow is the one that counts."""
    modules = project_modules()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    for package in [name for name, path in modules.items() if discovers_its_modules(path)]:
        plugins = {name for name in modules if name.rpartition(".")[0] == package}
        graph[package] |= plugins
        for plugin in plugins:
            graph[plugin].discard(package)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None: a depth-first search for an edge back to a
    module still on the stack."""
    state = {}  # absent: not seen; 1: on the stack; 2: done
    for start in sorted(graph):
        if start in state:
            continue
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        state[start] = 1
        while stack:
            node, edges = stack[-1]
            nxt = next(edges, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                path.append(nxt)
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per edge that closes one, until none is left: every circle to cut, not only the first found."""
    graph = {k: set(v) for k, v in graph.items()}
    cycles = []
    while (cycle := find_cycle(graph)) is not None:
        cycles.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    return cycles


def test_no_module_imports_itself_back():
    cycles = all_cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


# What the launcher (infra/, fabfile.py) may import from job/: modules that import neither torch nor numpy, so that it
# runs in a virtualenv of requirements-launcher.txt alone (docs/design.md, "Two sides and one contract").
# The recipes' cards and the trainer's parser are among them: their modules import torch only inside the functions the
# trainer calls (tests/test_card.py imports them and checks that neither torch nor numpy came along).
# job.stats is the record board's statistics over fetched runs (fab launch --runs prints them): the standard library only.
LAUNCHER_MAY_IMPORT = {"job.contract", "job.errors", "job.fsutil", "job.metrics", "job.config", "job.recipes", "job.gpt_config",
                       "job.speedrun_2025_05_24", "job.stats", "job.identity", "job.hub_token"}  # and job/sidecar/
BASE = {"job.contract", "job.fsutil"}  # the standard library only


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    def side(m):
        return m.split(".")[0]

    wrong = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            if side(a) == "job" and side(b) != "job":
                wrong.append(f"{a} -> {b}: job/ runs in the image, where the launcher is not")
            elif a in BASE:
                wrong.append(f"{a} -> {b}: the base layer imports no module of the project")
            elif a == "job.errors" and b not in BASE:
                wrong.append(f"{a} -> {b}: job.errors builds on job.contract and job.fsutil only")
            elif side(a) in ("infra", "fabfile") and side(b) == "job" and b not in LAUNCHER_MAY_IMPORT \
                    and not b.startswith("job.sidecar."):
                wrong.append(f"{a} -> {b}: the launcher takes from job/ only {sorted(LAUNCHER_MAY_IMPORT)} and job/sidecar/")
            elif a.startswith("job.sidecar.") and not (b in BASE | {"job.errors"} or b.startswith("job.sidecar.")):
                wrong.append(f"{a} -> {b}: the sidecars take from job/ only job.contract, job.errors and job.fsutil")
    return wrong


def test_the_import_layers_hold():
    wrong = layer_violations(import_graph())
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_import_graph_sees_every_kind_of_import(tmp_path):
    modules = {**project_modules(), "job.fake": tmp_path / "fake.py"}
    (tmp_path / "fake.py").write_text(
        "from typing import TYPE_CHECKING\nimport json\nimport job.model\nfrom job import contract, fsutil\n"
        "from job.recipes import Recipe\nfrom . import errors\n"
        "if TYPE_CHECKING:\n    from job.config import TrainConfig\nelse:\n    from job.tokenizer import EOT\n"
        "def f():\n    from job.checkpoint import load\n    class C:\n        import job.speedrun_2025_05_24.fp8\n")
    assert imported_modules("job.fake", tmp_path / "fake.py", modules) == {
        "job.model", "job.contract", "job.fsutil", "job.recipes", "job.errors", "job.tokenizer", "job.checkpoint",
        "job.speedrun_2025_05_24.fp8"}

    graph = import_graph()
    assert set(graph) == set(project_modules()) and "job.prepare.cli" in graph["job.prepare.__main__"]
    assert "job.recipes.gpt2" in graph["job.recipes"] and "job.recipes" not in graph["job.recipes.gpt2"]  # discovered
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"a", "c"}, "c": set()}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_violations({"job.contract": {"job.errors"}, "job.model": {"infra.ssh"}, "infra.ssh": {"job.model"},
                             "job.errors": {"job.contract", "job.fsutil"}, "infra.cloud": {"job.sidecar.s3"}}) == [
        f"infra.ssh -> job.model: the launcher takes from job/ only {sorted(LAUNCHER_MAY_IMPORT)} and job/sidecar/",
        "job.contract -> job.errors: the base layer imports no module of the project",
        "job.model -> infra.ssh: job/ runs in the image, where the launcher is not"]
