"""`fab dashboard`: the run's TensorBoard on the box, opened on the laptop through the launcher's SSH connection.

TensorBoard runs on the box in a container of the trainer's own image (like the S3 sidecar), with the weights dir
mounted read-only, on the host's network but bound to the box's loopback: nothing new is exposed to the internet.
The laptop listens on its own loopback and carries each browser connection to it over the SSH connection whose
host key was verified (a direct-tcpip channel, as `ssh -L` does). Ctrl-C (or SIGTERM) closes the tunnel; the TensorBoard
container stays up for the next `fab dashboard`, and the trainer never notices either.

(W&B, the other dashboard, needs its API key on the box: infra/credentials.py sends it with `fab launch`.)
"""

from __future__ import annotations

import json
import select
import shlex
import signal
import socket
import sys
import threading
import time

import paramiko

from infra.container import ROLE, find_train_container, running, weights_mount
from infra.ssh import ctrl_c_as_flag, run
from job import contract
from job.errors import UserError

TENSORBOARD_ROLE = "tensorboard"
TENSORBOARD_NAME = f"{contract.CONTAINER_NAME}-tensorboard"
PORT_LABEL = "nanogpt.tensorboard-port"  # the port it serves on: a dashboard asking for another starts a new one
READY_TIMEOUT = 120  # seconds for TensorBoard to start serving (its first load of the event files included)


def start_tensorboard(conn, docker: str, port: int = contract.TENSORBOARD_PORT, out=sys.stdout) -> str:
    """TensorBoard over the training container's weights dir, in that container's image; one already serving that
    dir on that port is reused, one serving another (an earlier run's) or on another port is replaced. A port that
    another program holds is refused before anything changes on the box."""
    train = find_train_container(conn, docker)
    weights = weights_mount(conn, docker, train["name"])
    ours = running(conn, docker, role=TENSORBOARD_ROLE) and label(conn, docker, TENSORBOARD_NAME, PORT_LABEL) == str(port)
    if ours and weights_mount(conn, docker, TENSORBOARD_NAME) == weights:
        return TENSORBOARD_NAME
    if not ours and answers(conn, port):  # TensorBoard would fail to bind, or the tunnel would reach the other program
        raise UserError(f"port {port} on the loopback of {conn.host} is taken by another program: pass --remote-port with "
                        "a free one there")
    image = run(conn, f"{docker} inspect --format '{{{{.Config.Image}}}}' {shlex.quote(train['name'])}", warn=True).stdout.strip()
    if not weights or not image:
        raise UserError(f"cannot tell the weights dir or image of {train['name']} on {conn.host}: launch the run again with fab launch")
    ids = run(conn, "id -u && id -g").stdout.split()
    run(conn, f"{docker} rm -f {TENSORBOARD_NAME} >/dev/null 2>&1", warn=True)
    # --load_fast=false: TensorBoard's Python reader, which honours the purge a resumed run's event file asks for.
    cmd = (f"{docker} run -d --init --name {TENSORBOARD_NAME} --label {ROLE}={TENSORBOARD_ROLE} --label {PORT_LABEL}={int(port)} "
           "--network host "
           f"--user {ids[0]}:{ids[1]} -v {shlex.quote(f'{weights}:{contract.LOG_DIR}:ro')} {shlex.quote(image)} "
           f"tensorboard --logdir {contract.LOG_DIR} --host 127.0.0.1 --port {int(port)} --load_fast=false --reload_interval 10")
    res = run(conn, cmd, warn=True)
    if res.failed:
        raise UserError(f"could not start TensorBoard on {conn.host}: {' '.join(res.stderr.split())[:300]}")
    out.write(f"started {TENSORBOARD_NAME} on {conn.host} (its loopback, port {port}) over {weights}\n")
    return TENSORBOARD_NAME


def label(conn, docker: str, name: str, key: str) -> str:
    """A label of container `name` on the box ("" where it has none, or there is no such container)."""
    fmt = shlex.quote("{{index .Config.Labels " + json.dumps(key) + "}}")
    res = run(conn, f"{docker} inspect --format {fmt} {shlex.quote(name)}", warn=True)
    value = res.stdout.strip() if res.ok else ""
    return "" if value == "<no value>" else value


def answers(conn, port: int) -> bool:
    """Whether something accepts a connection on the box's 127.0.0.1:port (reached through the SSH connection)."""
    try:
        conn.transport.open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0), timeout=10).close()
        return True
    except (paramiko.ChannelException, paramiko.SSHException):
        return False


def wait_ready(conn, docker: str, port: int, timeout: float = READY_TIMEOUT) -> None:
    """Until the box's 127.0.0.1:port accepts a connection through the tunnel, or the container has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if answers(conn, port):
            return
        if not running(conn, docker, role=TENSORBOARD_ROLE):
            logs = run(conn, f"{docker} logs --tail 5 {TENSORBOARD_NAME} 2>&1", warn=True).stdout
            raise UserError(f"TensorBoard exited on {conn.host}: {' '.join(logs.split())[-300:]}")
        if time.monotonic() > deadline:
            raise UserError(f"TensorBoard on {conn.host} did not answer on port {port} within {timeout:.0f} s: "
                            f"see `docker logs {TENSORBOARD_NAME}` there")
        time.sleep(0.5)


def listen(local_port: int) -> socket.socket:
    """The laptop's end of the tunnel, on its loopback; 0 picks a free port."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(("127.0.0.1", local_port))
    except OSError as e:
        server.close()
        raise UserError(f"cannot listen on 127.0.0.1:{local_port} here ({e.strerror}): pass another --local-port "
                        "(0 picks a free one)") from None
    server.listen(32)
    return server


def _pump(client: socket.socket, channel) -> None:
    """Copy bytes both ways until either side closes."""
    try:
        while True:
            ready, _, _ = select.select([client, channel], [], [], 60)
            for src, dst in ((client, channel), (channel, client)):
                if src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    dst.sendall(data)
    except OSError:
        return
    finally:
        channel.close()
        client.close()


def forward(conn, server: socket.socket, remote_port: int, pairs: list, stop: threading.Event) -> None:
    """Serve the tunnel until `stop` is set (Ctrl-C) or the SSH connection drops; `pairs` collects the open
    (browser socket, SSH channel) pairs, for the caller to close."""
    transport = conn.transport
    server.settimeout(0.5)  # wake up now and then to notice the stop or a dropped connection
    while not stop.is_set():
        if not transport.is_active():
            raise UserError(f"the SSH connection to {conn.host} dropped: run fab dashboard again (training is not affected)")
        try:
            client, peer = server.accept()
        except TimeoutError:
            continue
        try:
            channel = transport.open_channel("direct-tcpip", ("127.0.0.1", remote_port), peer, timeout=10)
        except (paramiko.ChannelException, paramiko.SSHException, EOFError):
            client.close()  # TensorBoard is restarting, or gone: the browser retries
            continue
        pairs.append((client, channel))
        threading.Thread(target=_pump, args=(client, channel), daemon=True).start()


def dashboard(conn, docker: str, local_port: int, remote_port: int = contract.TENSORBOARD_PORT, out=sys.stdout) -> None:
    server, pairs = listen(local_port), []
    try:
        start_tensorboard(conn, docker, remote_port, out=out)
        wait_ready(conn, docker, remote_port)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/"
        out.write(f"TensorBoard of the run on {conn.host}: open {url}  (Ctrl-C closes the tunnel; training goes on)\n")
        out.flush()
        # Ctrl-C, or a SIGTERM from whatever started this in the background, ends the tunnel at a known place.
        with ctrl_c_as_flag(signal.SIGTERM) as stop:
            forward(conn, server, remote_port, pairs, stop)
        out.write(f"\nclosed the tunnel to {conn.host}; training goes on, and {TENSORBOARD_NAME} keeps serving there "
                  "for the next fab dashboard\n")
    finally:
        server.close()
        # Every channel closed before the connection is: closing the SSH transport then waits on nothing.
        for client, channel in pairs:
            channel.close()
            client.close()
