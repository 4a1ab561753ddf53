"""infra.ssh against a real OpenSSH server on 127.0.0.1: host key checks and one-line errors, no mocks."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import fabric
import pytest

from infra.ssh import _explain, connect, run, stream
from job.errors import UserError
from tests.sshd import free_port, keygen, sshd_fixture

sshd = sshd_fixture(scope="module")


def user_error(**kw) -> str:
    with pytest.raises(UserError) as e:
        connect(**kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_connect_runs_command(sshd):
    conn = connect(sshd.address, key=sshd.key_path, known_hosts=sshd.known_hosts_path)
    try:
        assert run(conn, "echo hi").stdout.strip() == "hi"
    finally:
        conn.close()


class SlowFinalizer:
    """Stands for paramiko's Channel.__del__: a finalizer that runs on the main thread while Ctrl-C arrives."""

    def __del__(self):
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            time.sleep(0.01)


class FinalizingOutput(io.StringIO):
    def __init__(self):
        super().__init__()
        self.victim = SlowFinalizer()

    def write(self, text):
        n = super().write(text)
        self.victim = None  # the first line frees it: its finalizer runs here, on the main thread, for 2 s
        return n


def test_ctrl_c_during_a_finalizer_still_stops_streaming(sshd):
    # Python drops an exception raised inside a finalizer, so a KeyboardInterrupt that lands in one (paramiko frees
    # old channels at any time) was lost and the streaming ignored Ctrl-C. The box prints one line, then nothing
    # for 30 s; Ctrl-C comes while the finalizer runs: streaming must still end at once, SIGINT handed back after.
    conn = connect(sshd.address, key=sshd.key_path, known_hosts=sshd.known_hosts_path)
    out = FinalizingOutput()
    before = signal.getsignal(signal.SIGINT)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            stream(conn, "echo started; sleep 30; echo too-late", out=out)
        assert time.monotonic() - t0 < 6
        assert out.getvalue() == "started\n"
        assert signal.getsignal(signal.SIGINT) is before
        assert run(conn, "echo still-usable").stdout.strip() == "still-usable"  # the connection survives the detach
    finally:
        timer.cancel()
        conn.close()


def test_unknown_host_refused_then_accept_new(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    msg = user_error(host=sshd.address, key=sshd.key_path, known_hosts=str(kh))
    assert "--accept-new-host-key" in msg and "ssh-keyscan" in msg
    assert kh.read_text() == ""
    connect(sshd.address, key=sshd.key_path, known_hosts=str(kh), accept_new_host_key=True).close()
    assert kh.read_text() == sshd.host_public_key_line + "\n"
    connect(sshd.address, key=sshd.key_path, known_hosts=str(kh)).close()  # now known: no flag needed


def test_accept_new_creates_known_hosts(sshd, tmp_path):
    kh = tmp_path / "ssh" / "known_hosts"  # neither file nor directory exists yet
    connect(sshd.address, key=sshd.key_path, known_hosts=str(kh), accept_new_host_key=True).close()
    assert kh.stat().st_mode & 0o777 == 0o600 and kh.read_text() == sshd.host_public_key_line + "\n"


def test_changed_host_key_refused(sshd, tmp_path):
    other = keygen(tmp_path / "other_host")
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    for accept in (False, True):
        msg = user_error(host=sshd.address, key=sshd.key_path, known_hosts=str(kh), accept_new_host_key=accept)
        assert "HOST KEY CHANGED" in msg and "man-in-the-middle" in msg and "ssh-keygen -R" in msg
    assert kh.read_text() == f"[127.0.0.1]:{sshd.port} {other}\n"


def test_wrong_user_key(sshd, tmp_path):
    keygen(tmp_path / "stranger")
    msg = user_error(host=sshd.address, key=str(tmp_path / "stranger"), known_hosts=sshd.known_hosts_path)
    assert "authentication failed" in msg and "--key" in msg and sshd.user in msg


def test_closed_port(sshd):
    msg = user_error(host=f"{sshd.user}@127.0.0.1", port=free_port(), key=sshd.key_path, known_hosts=sshd.known_hosts_path)
    assert "refused" in msg and "--port" in msg


def test_timeout(tmp_path):
    t0 = time.monotonic()
    msg = user_error(host="root@10.255.255.1", known_hosts=str(tmp_path / "kh"), timeout=1)
    assert time.monotonic() - t0 < 5
    # Where the sandbox has no route at all the kernel answers "unreachable" at once instead of timing out.
    assert "10.255.255.1" in msg and ("security group / firewall" in msg or "unreachable" in msg.lower()), msg


@pytest.mark.parametrize("exc, words", [(TimeoutError("timed out"), "security group / firewall"),
                                         (OSError(errno.ENETUNREACH, "Network is unreachable"), "Network is unreachable")])
def test_network_errors_explained(exc, words):
    # Sandboxes differ in how a dead address fails (timeout, unreachable, a proxy that accepts everything): check each wording.
    msg = _explain(exc, fabric.Connection("10.255.255.1", user="root"), "root@10.255.255.1:22", "kh")
    assert words in msg and "10.255.255.1" in msg and "\n" not in msg


def test_dns_failure(tmp_path):
    msg = user_error(host="root@no-such-host.invalid", known_hosts=str(tmp_path / "kh"), timeout=2)
    assert msg == "cannot resolve no-such-host.invalid: check the address"


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client")
def test_known_hosts_line_matches_openssh(sshd, tmp_path):
    # The line accept-new writes is one OpenSSH itself accepts (StrictHostKeyChecking=yes).
    kh = tmp_path / "known_hosts"
    connect(sshd.address, key=sshd.key_path, known_hosts=str(kh), accept_new_host_key=True).close()
    r = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={kh}", "-i", sshd.key_path,
                        "-p", str(sshd.port), f"{sshd.user}@127.0.0.1", "echo", "ok"], capture_output=True, text=True, timeout=10)
    assert r.stdout.strip() == "ok", r.stderr
    assert Path(kh).read_text().count("\n") == 1
