"""A real OpenSSH server on 127.0.0.1 for tests: throwaway host key, user key and config in a tmp dir.

Plain module (start_sshd / SSHServer.stop) plus a pytest fixture factory (sshd_fixture). Needs root or a user
sshd can log in as: it runs as the current user and authorizes a freshly generated key for that user.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"  # sshd refuses to re-exec itself unless started by absolute path
SKIP_REASON = "openssh-server is not installed (CI installs it in .ci/run)"


@dataclass
class SSHServer:
    host: str
    port: int
    user: str
    key_path: str  # private key authorized for `user`
    known_hosts_path: str  # holds the correct `[127.0.0.1]:PORT ssh-ed25519 ...` line
    host_public_key_line: str  # that line, without the newline
    proc: subprocess.Popen
    auth_dir: Path | None = None  # outside tmp_dir for another user; removed on stop

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.auth_dir:
            shutil.rmtree(self.auth_dir, ignore_errors=True)


def sshd_available() -> bool:
    return os.path.exists(SSHD) and shutil.which("ssh-keygen") is not None


def keygen(path: str | Path) -> str:
    """Generate an unencrypted ed25519 key pair at `path` (+ .pub); return the public key as `type base64`."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)], check=True, capture_output=True)
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


def free_port() -> int:
    """A port nothing listens on right now (the OS picked it, then we let go of it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sshd(tmp_dir: str | Path, timeout: float = 10, user: str | None = None, user_key: str | Path | None = None,
               extra_config: str = "") -> SSHServer:
    """sshd for `user` (default: the current one). user_key: reuse that key pair instead of generating one (several
    boxes, one laptop key). extra_config: more sshd_config lines (e.g. `SetEnv PATH=...` for a box without docker; every variable on that one
    SetEnv line, as sshd reads only the first)."""
    d = Path(tmp_dir)
    d.mkdir(parents=True, exist_ok=True)
    host_key = d / "host_ed25519"
    host_pub = keygen(host_key)
    if user_key is None:
        user_key = d / "user_ed25519"
        keygen(user_key)
    # sshd reads authorized_keys as the user logging in: for another user it must sit where that user can read it.
    auth_dir = d if user is None else Path(tempfile.mkdtemp(prefix="sshd-auth-"))
    auth_dir.chmod(auth_dir.stat().st_mode | 0o755)
    (auth_dir / "authorized_keys").write_text(Path(f"{user_key}.pub").read_text())
    port = free_port()
    known_hosts_line = f"[127.0.0.1]:{port} {host_pub}"
    (d / "known_hosts").write_text(known_hosts_line + "\n")
    config = d / "sshd_config"
    # SHLVL=1: the command's shell does not read the user's ~/.bashrc (bash reads it for a command over ssh only when
    # started at level 1). A cloud box's is a distribution's, which returns at once when not interactive; the user here
    # may be this machine's own, whose ~/.bashrc can start a developer's tools (pyenv's init: a tenth of a second of CPU
    # for every command the launcher runs). The launcher sets what it needs in each command, as on a box.
    # sshd takes the first SetEnv line only: one line holds the caller's variables and SHLVL.
    lines = extra_config.splitlines()
    setenv = [ln for ln in lines if ln.startswith("SetEnv ")]
    assert len(setenv) <= 1, "start_sshd: give every SetEnv variable on one line"
    extra = "\n".join([ln for ln in lines if not ln.startswith("SetEnv ")] + [(setenv[0] if setenv else "SetEnv") + " SHLVL=1"])
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {auth_dir / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
        f"StrictModes no\nUsePAM no\nPidFile {d / 'sshd.pid'}\nSubsystem sftp internal-sftp\n{extra}\n"
    )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir; absent in slim images
    log = open(d / "sshd.log", "wb")  # a file, not a pipe: a full pipe would block sshd
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    server = SSHServer("127.0.0.1", port, user or getpass.getuser(), str(user_key), str(d / "known_hosts"), known_hosts_line, proc,
                       auth_dir if user is not None else None)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {(d / 'sshd.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"sshd did not listen on {port} within {timeout}s: {(d / 'sshd.log').read_text()}") from None
            time.sleep(0.05)


def sshd_fixture(scope: str = "module"):
    """Make a pytest fixture yielding a running SSHServer: `sshd = sshd_fixture()` at module level in a test file."""

    @pytest.fixture(scope=scope)
    def _sshd(tmp_path_factory):
        if not sshd_available():
            pytest.skip(reason=SKIP_REASON)
        server = start_sshd(tmp_path_factory.mktemp("sshd"))
        yield server
        server.stop()

    return _sshd
