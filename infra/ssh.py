"""SSH to the GPU box with host keys always verified, and every failure turned into one actionable line."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time

import fabric
import invoke
import paramiko

from job.errors import UserError

SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
# paramiko logs tracebacks from its transport thread; with no logging configured they would land on stderr
# above our one-line error. A NullHandler keeps them quiet unless the app sets up logging itself.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


# What a host may be: a name or an IPv4 address (an ~/.ssh/config alias may hold `_`), or an IPv6 address. Anything
# else is a typo, refused before it reaches a resolver.
LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
HOST_NAME = re.compile(rf"{LABEL}(?:\.{LABEL})*\.?")
IPV6 = re.compile(r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(%[A-Za-z0-9_.-]+)?")
USER_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.@-]*")


def _bad_ipv4(name: str) -> bool:
    """All digits and dots, yet not an IPv4 address (999.1.1.1): a resolver would take it for a name."""
    if not re.fullmatch(r"[0-9.]+", name):
        return False
    try:
        ipaddress.IPv4Address(name)
        return False
    except ValueError:
        return True


def parse_host(host: str, port: int | None = None) -> tuple[str | None, str, int | None]:
    """`user@host:port`, `user@host`, `host`, `[v6addr]:port` -> (user, host, port); an explicit `port` must agree."""
    user, at, rest = host.rpartition("@")
    hostname, hport = rest, None
    if rest.startswith("[") and "]" in rest:  # bracketed IPv6, as in known_hosts
        hostname, _, tail = rest[1:].partition("]")
        hport = tail[1:] if tail.startswith(":") else None
    elif rest.count(":") == 1:
        hostname, hport = rest.split(":")
    if hport is not None:
        if not (hport.isascii() and hport.isdigit() and 1 <= int(hport) <= 65535):
            raise UserError(f"bad port in {host!r}: expected user@host:PORT with a port number from 1 to 65535")
        if port is not None and int(hport) != port:
            raise UserError(f"{host!r} says port {hport} but --port is {port}: give the port once")
        port = int(hport)
    if port is not None and not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a port number: pass one from 1 to 65535")
    if not hostname:
        raise UserError(f"no host name in {host!r}: expected user@host or user@host:port")
    if not (HOST_NAME.fullmatch(hostname) or IPV6.fullmatch(hostname)) or _bad_ipv4(hostname):
        raise UserError(f"{hostname!r} in {host!r} is not a host name or IP address: expected user@host, e.g. ubuntu@203.0.113.7")
    if at and not USER_NAME.fullmatch(user):
        raise UserError(f"bad user name {user!r} in {host!r}: expected user@host, e.g. ubuntu@203.0.113.7")
    return user or None, hostname, port


class UnknownHostKey(Exception):
    pass


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Called only for hosts with no known_hosts entry at all; a known host with another key raises BadHostKeyException
    inside paramiko before we get here. Like OpenSSH's StrictHostKeyChecking=accept-new, never a silent AutoAddPolicy."""

    def __init__(self, known_hosts: str, accept_new: bool):
        self.known_hosts, self.accept_new = known_hosts, accept_new

    def missing_host_key(self, client, hostname, key):
        if not self.accept_new:
            raise UnknownHostKey(hostname)
        os.makedirs(os.path.dirname(self.known_hosts) or ".", mode=0o700, exist_ok=True)
        fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)


def connect(host: str, *, port: int | None = None, key: str | None = None, known_hosts: str | None = None,
            accept_new_host_key: bool = False, timeout: float = 10, opened=None) -> fabric.Connection:
    """Open and check an SSH connection (runs `true`); raise UserError with the fix on any failure. opened(conn), if
    given, is called once the connection is up and its host key verified (and known), before the check: fetch-weights
    starts its own OpenSSH session there, so that the two logins overlap."""
    user, hostname, port = parse_host(host, port)
    known_hosts = os.path.expanduser(known_hosts or "~/.ssh/known_hosts")
    if key and not os.path.isfile(os.path.expanduser(key)):
        raise UserError(f"SSH key {key} does not exist: pass the private key file with --key")
    # With --key use only that key (like IdentitiesOnly), so a wrong key fails clearly instead of trying the agent's.
    auth = dict(key_filename=[os.path.expanduser(key)], allow_agent=False, look_for_keys=False) if key else {}
    conn = fabric.Connection(hostname, user=user, port=port, connect_kwargs=dict(auth, banner_timeout=timeout, auth_timeout=timeout))
    conn.connect_timeout = timeout  # set after init: Connection() would int() it, turning 0.5 s into "no timeout"
    conn.known_hosts_files = (SYSTEM_KNOWN_HOSTS, known_hosts)  # for openssh_command: the same keys, verified alike
    conn.key_file = os.path.expanduser(key) if key else None
    client = conn.client
    for f in (SYSTEM_KNOWN_HOSTS, known_hosts):  # "system" keys are read-only for paramiko: it never rewrites these files
        if os.path.isfile(f):
            client.load_system_host_keys(f)
    client.set_missing_host_key_policy(_HostKeyPolicy(known_hosts, accept_new_host_key))
    where = f"{conn.user}@{conn.host}:{conn.port}"
    try:
        conn.open()
        if opened is not None:
            opened(conn)
        run(conn, "true", timeout=timeout)
        return conn
    except Exception as e:
        conn.close()
        raise UserError(_explain(e, conn, where, known_hosts)) from e


def run(conn: fabric.Connection, cmd: str, *, hide: bool = True, warn: bool = False, **kw) -> invoke.Result:
    """conn.run without forwarding our stdin: a launcher has nothing to type, and a captured stdin (pytest, CI) makes invoke fail."""
    return conn.run(cmd, hide=hide, warn=warn, in_stream=False, **kw)


class ConnectionLost(UserError):
    pass


# OpenSSH's own list with AES-GCM first: with the AES instructions of every x86-64 CPU since 2010 and every arm64
# laptop, AES-GCM takes both ends less CPU than chacha20-poly1305, OpenSSH's first choice (about 1.2 s less per 1.4 GB,
# docs/BENCHMARKS.md). A box that offers no GCM still agrees on one of the rest.
BULK_CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr"


def openssh_command(conn: fabric.Connection, cmd: str) -> list[str] | None:
    """argv that runs `cmd` on the box through OpenSSH's own client (C: bulk bytes at scp's speed, where paramiko's
    Python packet loop is several times slower), or None where no `ssh` is installed. The host key must already be in
    the known_hosts files this connection verified it against (connect() put it there): never prompt, never add."""
    ssh = shutil.which("ssh")
    if ssh is None or not hasattr(conn, "known_hosts_files"):
        return None
    system, user = conn.known_hosts_files
    opts = {"BatchMode": "yes", "StrictHostKeyChecking": "yes", "UserKnownHostsFile": user, "GlobalKnownHostsFile": system,
            "ConnectTimeout": "10", "ServerAliveInterval": "15", "ControlPath": "none", "ForwardAgent": "no",
            "ClearAllForwardings": "yes", "LogLevel": "ERROR", "Ciphers": BULK_CIPHERS}
    argv = [ssh, "-T", "-p", str(conn.port), "-l", conn.user]
    if conn.key_file:
        argv += ["-i", conn.key_file, "-o", "IdentitiesOnly=yes"]
    for k, v in opts.items():
        argv += ["-o", f"{k}={v}"]
    return [*argv, "--", conn.host, cmd]


def stream(conn: fabric.Connection, cmd: str, out=None, stdin_chunks=None) -> int:
    """Run `cmd` on the box and copy its output here as it comes; return its exit status.

    A plain paramiko channel rather than conn.run: Ctrl-C here must only stop the *streaming* (the remote
    command, e.g. `docker logs -f`, is a viewer; training runs detached), and a dropped connection must be told
    apart from a command that ended. stdin_chunks, if given, is fed to the command's stdin (docker load).
    """
    out = out or sys.stdout
    chan = conn.client.get_transport().open_session()
    chan.set_combine_stderr(True)
    chan.exec_command(cmd)
    try:
        if stdin_chunks is not None:
            for chunk in stdin_chunks:
                chan.sendall(chunk)
            chan.shutdown_write()
        pending = b""
        with ctrl_c_as_flag() as interrupted:
            chan.settimeout(0.2)  # wake up to look at the flag even while the box sends nothing
            while True:
                if interrupted.is_set():
                    raise KeyboardInterrupt
                try:
                    data = chan.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    out.write(line.decode("utf-8", "replace") + "\n")
                out.flush()
        if pending:
            out.write(pending.decode("utf-8", "replace") + "\n")
            out.flush()
        # EOF. A command that ended sends its exit status; a dropped connection closes the channel without one
        # (paramiko leaves exit_status at -1) and takes the transport down: the command may still run there.
        chan.status_event.wait(5)
        if chan.exit_status == -1:
            transport = conn.client.get_transport()
            deadline = time.monotonic() + 5
            while transport is not None and transport.is_active() and time.monotonic() < deadline:
                time.sleep(0.05)
            if transport is None or not transport.is_active():
                raise ConnectionLost(f"lost the SSH connection to {conn.host}")
        return chan.exit_status
    except (OSError, EOFError, paramiko.SSHException) as e:
        raise ConnectionLost(f"lost the SSH connection to {conn.host} ({type(e).__name__})") from None
    finally:
        chan.close()


@contextlib.contextmanager
def ctrl_c_as_flag(*signals: int):
    """Ctrl-C (and any other of `signals`) sets an event instead of raising KeyboardInterrupt wherever the main thread
    happens to be.

    Raised asynchronously, the interrupt can land inside a finalizer (paramiko's Channel.__del__ runs whenever the
    garbage collector frees an earlier channel), where Python drops it: the streaming then ignored Ctrl-C. The
    caller checks the event between waits and stops at a known place. The handler is installed even where the
    process inherited SIGINT ignored (a job started in the background by a non-interactive shell), so the signal
    that ends a stream or a tunnel always ends it.
    """
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # only the main thread can own signal handlers
        yield flag
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: flag.set()) for sig in (signal.SIGINT, *signals)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _explain(e: Exception, conn: fabric.Connection, where: str, known_hosts: str) -> str:
    h = conn.host if conn.port == 22 else f"[{conn.host}]:{conn.port}"
    if isinstance(e, UnknownHostKey):
        return (f"unknown host key for {h} (not in {known_hosts}): verify and add it with `ssh-keyscan -p {conn.port} {conn.host} >> {known_hosts}`"
                ", or trust it on first use with --accept-new-host-key")
    if isinstance(e, paramiko.BadHostKeyException):
        return (f"HOST KEY CHANGED for {h}: possible man-in-the-middle; if the box was re-created remove the old line with "
                f"`ssh-keygen -R '{h}' -f {known_hosts}` and connect again")
    if isinstance(e, paramiko.AuthenticationException):
        return f"authentication failed for {where}: pass the private key authorized for user '{conn.user}' with --key, or use the right user@"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve {conn.host}: check the address"
    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):  # paramiko's wrapper for refused/unreachable
        errs = {getattr(x, "errno", None) for x in e.errors.values()}
        if errs <= {errno.ECONNREFUSED}:
            return f"connection refused by {conn.host}:{conn.port}: is sshd running there, and is this the right --port?"
        return f"cannot reach {conn.host}:{conn.port} (host unreachable): check the address, security group / firewall and your IP"
    if isinstance(e, invoke.exceptions.Failure):  # connected and authenticated, but the check command failed
        return f"connected to {where} but `true` failed ({type(e).__name__}): check the login shell of user '{conn.user}' on the box"
    if "protocol banner" in str(e):  # TCP connected, but no SSH greeting before the timeout
        return (f"timed out waiting for sshd's greeting from {conn.host}:{conn.port}: something accepted the connection but is not answering "
                "as sshd; check --port and that no security group / firewall / proxy is in the way")
    if isinstance(e, (TimeoutError, socket.timeout)) or "timeout" in str(e).lower() or "timed out" in str(e).lower():
        return (f"timed out connecting to {conn.host}:{conn.port}: check the security group / firewall allows SSH from your IP, "
                "and that the address is right")
    if isinstance(e, OSError) and e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return f"cannot reach {conn.host}:{conn.port} ({e.strerror}): check the address, your network, and the security group / firewall"
    msg = " ".join(str(e).split()) or type(e).__name__
    return f"SSH to {where} failed: {msg}: check the address, --port and that sshd is running there"
