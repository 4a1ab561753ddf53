"""Run many short command lines of this project's Python entry points without paying an interpreter's start-up and
imports for each: a fork server.

`ForkServer(preload, cwd, env)` starts one fresh Python process (`python tests/forkserver.py`) in that environment,
which imports the `preload` modules once and then, for each command line, forks a child that becomes the process the
command line would have started: its own pid, its own cwd and environment, stdin on /dev/null, stdout and stderr in
files of its own, `sys.argv` and `sys.path[0]` as the interpreter sets them, and the entry point run the way the
interpreter runs it (`python -m MOD`: runpy.run_module as `__main__`; `python PATH` and a console script whose
shebang is this interpreter, such as `fab`: runpy.run_path as `__main__`). The child then ends as the interpreter
ends a program: SystemExit's status (its message on stderr and 1 where it is not a number), or an uncaught
exception's traceback through sys.excepthook and 1; then it waits for its non-daemon threads, runs the atexit
handlers, flushes stdout and stderr and collects its garbage (running the finalizers of what it made). `run()`
returns what subprocess.run would: the exit status (minus the signal's number for a signal), stdout and stderr.

One step of an interpreter's exit is left out: tearing down every module. In a child that is most of its time (each
of the server's objects it touches is copied from the server's memory first) and concerns modules the command line
never imported itself; so a finalizer that only module teardown would run, and what it would print, is not seen.

What a child inherits from the server is what a fresh interpreter would have after the same imports, with these
guards: the server forks only while it runs no other thread (checked before each fork), holds no socket and no file
but its two pipes (closed in the child), sets no signal handler of its own, and the child reseeds numpy's global
generator (Python's `random` reseeds itself after a fork). An environment variable that a preloaded module read while
it was imported, or that the interpreter and its native libraries read at start-up (PYTHON*, OMP_*, LD_*...), cannot
be changed for a child: a command line whose environment differs from the server's in one runs in a subprocess
instead, as does any command line that is not a Python entry point of this interpreter. A module that scans the whole
environment while it is imported (tqdm looks for TQDM_* variables) is seen reading the variables the server has, not
one a command line adds. What stays shared is the string hash seed, so the children iterate a set of strings in the
same order, where fresh interpreters would differ.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve()


# --- the test's side ---------------------------------------------------------------------------------------------------

def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it at once (torchrun starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_process(argv: list[str], *, cwd: Path | str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=DEVNULL), except that
    a timeout kills the command's whole tree: subprocess.run kills only its child, and a grandchild left running (a
    torchrun rank, a container's client) would hold the output pipes open and keep the test waiting past its timeout."""
    with subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


class ForkServer:
    def __init__(self, preload: list[str], cwd: Path | str, env: dict[str, str]):
        self.cwd, self.env = str(cwd), dict(env)
        self.dir = tempfile.TemporaryDirectory(prefix="forkserver-")
        self.log = open(Path(self.dir.name) / "server.log", "w+")  # the server's own stderr: what it says if it dies
        # Unbuffered: select() on the pipe must not miss a reply already read into a buffer.
        self.proc = subprocess.Popen([sys.executable, str(HERE), *preload], cwd=self.cwd, env=self.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, bufsize=0)
        hello = self._reply(timeout=300)
        self.environ_read = set(hello["environ_read"])
        self.count = 0

    def _reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            if ready:  # the server exited: its stderr says why
                self.log.seek(0)
                raise RuntimeError(f"the fork server exited ({self.proc.wait()}):\n{self.log.read()}")
            raise subprocess.TimeoutExpired(self.proc.args, timeout)
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the fork server refused: {reply['error']}")
        return reply

    def entry_point(self, argv: list[str]) -> list | None:
        """How the server runs argv (["module", MOD, args] or ["path", PATH, args]), or None where it cannot."""
        if argv and argv[0] == sys.executable and len(argv) >= 3 and argv[1] == "-m":
            return ["module", argv[2], argv[3:]]
        if argv and argv[0] == sys.executable and len(argv) >= 2 and not argv[1].startswith("-"):
            return ["path", argv[1], argv[2:]]
        if argv and os.path.isfile(argv[0]):
            with open(argv[0], "rb") as f:
                first = f.readline().strip()
            if first == b"#!" + os.fsencode(sys.executable):  # a console script of this interpreter (fab)
                return ["path", argv[0], argv[1:]]
        return None

    def forks(self, argv: list[str], env: dict[str, str]) -> bool:
        """Whether argv in env runs in a forked child (else in a subprocess)."""
        changed = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)}
        return self.entry_point(argv) is not None and not any(self.read_at_start(k) for k in changed)

    def read_at_start(self, name: str) -> bool:
        """Whether the server's value of the variable is fixed: read by a preloaded module, or by the interpreter or a
        native library when the process started (PYTHONHASHSEED, PYTHONUNBUFFERED, OMP_NUM_THREADS, LD_PRELOAD...)."""
        return name in self.environ_read or name.startswith(("PYTHON", "OMP_", "MKL_", "OPENBLAS_", "LD_", "MALLOC_"))

    def run(self, argv: list[str], *, cwd: Path | str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        """run_process(argv, cwd=cwd, env=env, timeout=timeout): the same result, and a timeout kills the same tree."""
        if not self.forks(argv, env):
            return run_process(argv, cwd=cwd, env=env, timeout=timeout)
        kind, target, args = self.entry_point(argv)
        self.count += 1
        out, err = (str(Path(self.dir.name) / f"{self.count}.{name}") for name in ("out", "err"))
        request = {"kind": kind, "target": target, "argv0": argv[0], "args": args, "cwd": str(cwd), "env": env,
                   "stdout": out, "stderr": err}
        data = json.dumps(request).encode() + b"\n"
        while data:
            data = data[self.proc.stdin.write(data) :]
        pid = self._reply(timeout=60)["pid"]
        try:
            returncode = self._reply(timeout=timeout)["returncode"]
        except subprocess.TimeoutExpired:
            kill_tree(pid)  # the child and what it started; the server then reaps the child
            self._reply(timeout=60)
            raise subprocess.TimeoutExpired(argv, timeout) from None
        stdout, stderr = (Path(p).read_text() for p in (out, err))
        for p in (out, err):
            os.unlink(p)
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()
        self.log.close()
        self.dir.cleanup()


# --- the server --------------------------------------------------------------------------------------------------------

def preload(modules: list[str]) -> set[str]:
    """Import the modules; return the environment variables read while they were imported.

    A variable read by name counts. A scan of the whole environment does not make each variable it passes read: a scan
    iterates over the keys and looks each one up, either as it is yielded (`for k in os.environ`, `.items()`) or after
    listing them all (`dict(os.environ)`, which fsspec does: CPython lists a mapping's keys, then looks them up in that
    order), and such a lookup is the scan's, not a read by name (see the module's docstring for what that leaves out)."""
    read = set()
    getitem, iterate = os._Environ.__getitem__, os._Environ.__iter__
    # The key just yielded; the keys of the latest iteration that looked none up, and how many of them have been
    # looked up, in their order, since it ended.
    scan = {"last": None, "keys": [], "next": 0, "during": 0}

    def recording(self, key):  # os.getenv, environ.get and `in` all come here
        if key == scan["last"]:
            scan["during"] += 1
        elif scan["next"] < len(scan["keys"]) and scan["keys"][scan["next"]] == key:
            scan["next"] += 1
        else:
            read.add(key)
            scan["keys"] = []  # a read by name ends the listed keys' lookups
        scan["last"] = None
        return getitem(self, key)

    def scanning(self):
        keys = []
        scan["during"] = 0
        for key in iterate(self):
            keys.append(key)
            scan["last"] = key
            yield key
        scan.update(last=None, keys=[] if scan["during"] else keys, next=0)

    os._Environ.__getitem__, os._Environ.__iter__ = recording, scanning
    try:
        for name in modules:
            __import__(name)
    finally:
        os._Environ.__getitem__, os._Environ.__iter__ = getitem, iterate
    return read


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def exit_status(code) -> int:
    """The status the interpreter exits with for SystemExit(code), printing a code that is not a number."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def finish(status: int, interrupted: bool) -> None:
    """End the child as Py_FinalizeEx ends a process, up to the modules' teardown (see the module's docstring)."""
    threading._shutdown()  # wait for the non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            status = 120  # as the interpreter reports a failed flush
    gc.collect()
    if interrupted:  # after a KeyboardInterrupt the interpreter ends by SIGINT, so that its parent sees the signal
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


def child(request: dict, pipes: list) -> None:
    """The forked child: run the command line and exit with its status. Never returns."""
    gc.enable()
    status, interrupted = 0, False
    try:
        run_case(request, pipes)
    except SystemExit as e:
        status = exit_status(e.code)
    except BaseException as e:
        tb = e.__traceback__  # from the command line's own frames on, as the interpreter prints an uncaught exception
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__, "<frozen runpy>"):
            tb = tb.tb_next
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        status, interrupted = 1, isinstance(e, KeyboardInterrupt)
    finish(status, interrupted)


def run_case(request: dict, pipes: list) -> None:
    """Become `argv0 ...` in this process and run it."""
    for pipe in pipes:
        pipe.close()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    if "numpy" in sys.modules:  # numpy's global generator is seeded once per process, not per fork (random's is reseeded)
        sys.modules["numpy"].random.seed()
    target, args = request["target"], request["args"]
    if request["kind"] == "module":
        # `python -m` puts the working directory first on sys.path. The module runs afresh as __main__: a copy that the
        # preload imported under its own name would make runpy warn, so it goes (a package stays: it is only imported)
        sys.path[0] = os.getcwd()
        for name in (target, f"{target}.__main__"):
            if name in sys.modules and not hasattr(sys.modules[name], "__path__"):
                del sys.modules[name]
        sys.argv = [request["argv0"], *args]  # runpy sets argv[0] to the module's file
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path[0] = os.path.dirname(os.path.realpath(target))  # `python PATH` puts the script's directory first
        sys.argv = [target, *args]
        runpy.run_path(target, run_name="__main__")


def main() -> None:
    # Requests come on stdin and replies go on stdout; the children get neither (stdout moves to stderr here, so that
    # nothing printed by an import can break a reply).
    incoming, reply = os.fdopen(os.dup(0)), os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.path[0] = os.getcwd()  # as under `python -m`, while the preload imports
    gc.disable()  # until a child: a collection here would dirty pages the children share
    read = preload(sys.argv[1:])
    reply.write(json.dumps({"environ_read": sorted(read)}) + "\n")
    for line in incoming:
        request = json.loads(line)
        if threads() != 1:  # a thread would not exist in the child, and what it held (a lock) would stay held there
            reply.write(json.dumps({"error": f"{threads()} threads run in the server: forking it is unsafe"}) + "\n")
            return
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()  # the children's collections skip the server's objects (and leave their pages shared)
        pid = os.fork()
        if pid == 0:
            child(request, [incoming, reply])
        reply.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    main()
