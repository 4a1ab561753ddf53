"""job.contract: the one table of exit statuses, and the values the launcher reads from it instead of the trainer's
modules (which import torch) agree with those modules."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT
from job import contract
from job.errors import END_REASONS, RankLost, TrainingDiverged, UserError


def test_errors_and_end_reasons_take_their_statuses_from_the_table():
    assert (UserError.exit_code, TrainingDiverged.exit_code, RankLost.exit_code) == (2, 3, 4)
    assert {UserError.exit_code, TrainingDiverged.exit_code, RankLost.exit_code, contract.EXIT_INTERRUPTED} <= set(contract.EXIT_STATUSES)
    assert END_REASONS is contract.END_REASONS and set(END_REASONS.values()) <= set(contract.EXIT_STATUSES)


def test_the_launcher_explains_each_status_from_the_table():
    from infra.launch import failure_advice

    for code, meaning in contract.EXIT_STATUSES.items():
        line = failure_advice("box", code)
        assert line.startswith(f"training on box exited with status {code}: {meaning}; ") and "\n" not in line
    assert "killed by SIGTERM" in failure_advice("box", 143)
    assert "launch again" in failure_advice("box", 77)


def printed_table() -> str:
    proc = subprocess.run([sys.executable, "-m", "job.contract", "exit-codes"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_exit_codes_prints_one_markdown_row_per_status():
    rows = [line for line in printed_table().splitlines() if line.startswith("| ")]
    assert rows[0] == "| Status | Meaning |" and rows[1].startswith("| ---")
    assert [r.split("|")[1].strip() for r in rows[2:]] == [*map(str, sorted(contract.EXIT_STATUSES)), "128+N"]


def documented_tables() -> dict[str, str]:
    """{doc: the Markdown table under its "Exit statuses" heading} for each docs/*.md that has one."""
    found = {}
    for doc in sorted((ROOT / "docs").glob("*.md")):
        m = re.search(r"^#+\s*Exit statuses\s*\n(.*?)(?=^#|\Z)", doc.read_text(), flags=re.M | re.S)
        if m:
            table = [line.strip() for line in m.group(1).splitlines() if line.strip().startswith("|")]
            found[doc.name] = "\n".join(table) + "\n"
    return found


def test_the_docs_table_is_the_printed_one():
    tables = documented_tables()
    if not tables:
        pytest.skip(reason="no docs/*.md has an \"Exit statuses\" heading yet: paste `python -m job.contract exit-codes` under one")
    for doc, table in tables.items():
        assert table == printed_table(), f"docs/{doc} differs from `python -m job.contract exit-codes`: paste its output there"
