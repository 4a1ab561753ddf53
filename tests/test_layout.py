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
