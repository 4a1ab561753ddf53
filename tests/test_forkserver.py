"""tests/forkserver.py, which tests/test_bad_inputs.py runs its cases in: a command line run in a forked child gives
what the same command line gives in a subprocess (exit status, stdout, stderr, a traceback), and one whose environment
changes what a preloaded module read at import runs in a subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import conftest
from conftest import env, run_forked
from forkserver import ForkServer

SCRIPTS = {
    "exit3": "import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)\n",
    "uncaught": "def f():\n    raise ValueError('boom')\nprint('partial', end='')\nf()\n",
    "exit_message": "import sys\nsys.exit('a message')\n",
    "finishes": textwrap.dedent("""\
        import atexit, sys, threading, time
        atexit.register(lambda: print('atexit ran'))
        threading.Thread(target=lambda: (time.sleep(0.2), print('thread ran'))).start()
        print('main done')
        """),
    "context": textwrap.dedent("""\
        import os, sys
        print(os.environ.get('FS_CASE'), os.getcwd(), sys.argv, sys.path[0], repr(sys.stdin.read()), os.environ.get('FS_GONE'))
        """),
    "killed": "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("forkserver")
    for name, code in SCRIPTS.items():
        (d / f"{name}.py").write_text(code)
    (d / "pkg").mkdir()
    (d / "pkg" / "__init__.py").write_text("")
    (d / "pkg" / "mod.py").write_text("import sys\nprint(__name__, sys.argv[1:], __spec__.name)\nraise SystemExit(2)\n")
    (d / "reads_at_import.py").write_text(textwrap.dedent("""\
        import os
        VALUE = os.environ.get('FS_READ_AT_IMPORT')
        OWN = {k: v for k, v in os.environ.items() if k.startswith('FS_OWN_')}  # a scan, as tqdm's for TQDM_*
        COPY = dict(os.environ)  # a copy, as fsspec's: every key listed first, then each looked up
        LATER = os.environ.get('FS_LISTED_THEN_READ')  # by name, after the copy listed it
        """))
    e = env(PYTHONPATH=str(d), FS_GONE="here", FS_SCANNED="at the server's start", FS_LISTED_THEN_READ="read")
    s = ForkServer(["reads_at_import"], cwd=d, env=e)
    yield s, d, e
    s.close()


@pytest.mark.parametrize("argv", [[name, "a b", "--flag"] for name in SCRIPTS] + [["-m", "pkg.mod", "x"]], ids=lambda a: a[0] + a[1])
def test_a_forked_child_gives_what_a_subprocess_gives(server, argv):
    s, d, e = server
    argv = [sys.executable, *(str(d / f"{a}.py") if a in SCRIPTS else a for a in argv)]
    case_env = dict(e, FS_CASE="set for this case")
    del case_env["FS_GONE"]
    assert s.forks(argv, case_env)
    forked = s.run(argv, cwd=d, env=case_env, timeout=60)
    sub = subprocess.run(argv, cwd=d, env=case_env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert (forked.returncode, forked.stdout) == (sub.returncode, sub.stdout)
    if argv[1] == "-m":  # the interpreter's own frames above the module differ: the error's line is the same
        assert forked.stderr.splitlines()[-1:] == sub.stderr.splitlines()[-1:]
    else:
        assert forked.stderr == sub.stderr


def test_a_variable_read_at_import_is_not_changed_in_a_child(server):
    s, d, e = server
    argv = [sys.executable, str(d / "exit3.py")]
    assert "FS_READ_AT_IMPORT" in s.environ_read
    assert not s.forks(argv, dict(e, FS_READ_AT_IMPORT="1"))  # a subprocess runs it instead
    assert not s.forks(argv, dict(e, PYTHONHASHSEED="1"))
    assert s.forks(argv, dict(e, FS_OTHER="1"))
    # The scans passed every variable without reading it by name: one that differs per command line (as pytest's
    # PYTEST_CURRENT_TEST differs per test) still lets the command line fork. A read by name after them counts.
    assert "FS_SCANNED" not in s.environ_read and "FS_GONE" not in s.environ_read and "PATH" not in s.environ_read
    assert "FS_LISTED_THEN_READ" in s.environ_read
    assert s.forks(argv, dict(e, FS_SCANNED="another value"))
    assert s.run(argv, cwd=d, env=dict(e, FS_READ_AT_IMPORT="1"), timeout=60).returncode == 3


def test_run_forked_starts_its_server_without_the_first_command_lines_own_variables(server):
    """conftest's run_forked: a first command line that sets a variable its server's imports read runs (in a
    subprocess), and the server it starts has the base environment, so the command lines after it still fork."""
    _, d, e = server
    argv = [sys.executable, str(d / "exit3.py")]
    preload = ["reads_at_import", "json"]  # a server of this test's own
    assert run_forked(argv, preload, e, dict(e, FS_READ_AT_IMPORT="1"), 60).returncode == 3
    started = conftest._servers[tuple(preload)]
    assert "FS_READ_AT_IMPORT" not in started.env and started.forks(argv, e)
    assert run_forked(argv, preload, e, e, 60).returncode == 3


# A command that starts a process in a session of its own (as torchrun starts its ranks), which keeps the output open.
SPAWNS = textwrap.dedent("""\
    import subprocess, sys, time
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    open(sys.argv[1], "w").write(str(child.pid))
    time.sleep(300)
    """)


def ended(pid: int, within: float = 10) -> bool:
    """Whether the process is gone (or a zombie whose parent has not reaped it yet) within that many seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "subprocess"])
def test_a_command_past_its_timeout_is_killed_with_what_it_started(server, tmp_path, forked):
    s, d, e = server
    (tmp_path / "spawns.py").write_text(SPAWNS)
    argv = [sys.executable, str(tmp_path / "spawns.py"), str(tmp_path / "pid")]
    case_env = e if forked else dict(e, FS_READ_AT_IMPORT="1")  # a variable the server read: a subprocess runs it
    assert s.forks(argv, case_env) == forked
    with pytest.raises(subprocess.TimeoutExpired):
        s.run(argv, cwd=d, env=case_env, timeout=5)
    grandchild = int((tmp_path / "pid").read_text())
    try:
        assert ended(grandchild)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)
    assert s.run([sys.executable, str(d / "exit3.py")], cwd=d, env=e, timeout=60).returncode == 3  # the server goes on
