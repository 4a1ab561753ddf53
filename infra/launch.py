"""`fab launch`: connect, preflight, image, data, sidecar, run, stream; one or several boxes.

Each step is idempotent (re-running launch after a failure redoes only what is missing) and fails with one
line. The trainer resumes from the newest checkpoint in the weights dir by itself (--resume auto).
"""

from __future__ import annotations

import io
import shlex
import sys
from dataclasses import dataclass, field

from infra.box import Box, preflight, table
from infra.image import ensure_image
from infra.ssh import ConnectionLost, connect, run, stream
from infra.trainer import ROLE, Job, docker_base, ensure_data, exit_code, refuse_if_active, running, start, stop_container, stream_logs
from job import contract
from job.errors import UserError

CREDENTIALS = ".config/nanogpt/aws-credentials"  # on the box, relative to the user's home; 0600
SECRET_MOUNT = "/run/nanogpt/aws-credentials"


@dataclass
class SSHOptions:
    key: str | None = None
    port: int | None = None
    known_hosts: str | None = None
    accept_new_host_key: bool = False

    def connect(self, host: str):
        if not host:
            raise UserError("no box given: pass --host ubuntu@IP")
        return connect(host, port=self.port, key=self.key, known_hosts=self.known_hosts, accept_new_host_key=self.accept_new_host_key)


@dataclass
class LaunchOptions:
    hosts: list[str]
    ssh: SSHOptions = field(default_factory=SSHOptions)
    job: Job = field(default_factory=Job)
    image: str | None = None
    ship: bool = False
    build_args: dict[str, str] = field(default_factory=dict)
    wheels: str | None = None
    fs: str | None = None
    data_dir: str | None = None
    weights_dir: str = "~/model_weights"
    allow_cpu: bool = False
    detach: bool = False
    restart: bool = False
    sync_s3: str | None = None
    s3_endpoint: str | None = None
    master_addr: str | None = None  # the first host's address as the others reach it (default: as given)
    master_port: int = 29500


def hint(host: str) -> str:
    return (f"training goes on on {host}. Re-attach: fab logs --host {host}   status: fab status --host {host}   "
            f"stop (with a checkpoint): fab stop --host {host}")


def send_aws_credentials(conn) -> str:
    """Write the laptop's AWS credentials to a 0600 file on the box; return its absolute path. They travel on
    the SSH channel's stdin, never on a command line."""
    import boto3

    session = boto3.Session()
    creds = session.get_credentials()
    if creds is None:
        raise UserError("--sync-s3 needs AWS credentials on this machine: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                        "(or run aws configure)")
    frozen = creds.get_frozen_credentials()
    lines = ["[default]", f"aws_access_key_id = {frozen.access_key}", f"aws_secret_access_key = {frozen.secret_key}"]
    if frozen.token:
        lines.append(f"aws_session_token = {frozen.token}")
    if session.region_name:
        lines.append(f"region = {session.region_name}")
    body = ("\n".join(lines) + "\n").encode()
    path = run(conn, f'printf %s "$HOME/{CREDENTIALS}"').stdout
    q = shlex.quote(path)
    cmd = f"umask 077 && mkdir -p \"$(dirname {q})\" && cat > {q}.tmp && chmod 600 {q}.tmp && mv {q}.tmp {q}"
    if stream(conn, cmd, out=io.StringIO(), stdin_chunks=[body]) != 0:
        raise UserError(f"could not write the AWS credentials file on {conn.host}: check that ~/.config is writable there")
    return path


def start_sidecar(conn, box: Box, image: str, url: str, endpoint: str | None, out=sys.stdout) -> str:
    """Replace any sidecar of an earlier launch (it finishes its pass on SIGTERM) and start a new one."""
    for c in running(conn, box.docker, role="sync"):
        stop_container(conn, box.docker, c["name"], timeout=120, out=out)
    name = f"{contract.CONTAINER_NAME}-sync"
    run(conn, f"{box.docker} rm -f {name} >/dev/null 2>&1", warn=True)
    creds = send_aws_credentials(conn)
    flags = docker_base(box, detach=True, name=name, labels={ROLE: "sync"}, network_host=True)
    flags = flags.replace(" --gpus all", "").replace(" --ulimit memlock=-1 --ulimit stack=67108864", "")  # no GPU for uploads
    flags += f" -v {shlex.quote(f'{creds}:{SECRET_MOUNT}:ro')} -e AWS_SHARED_CREDENTIALS_FILE={SECRET_MOUNT}"
    if endpoint:
        flags += f" -e AWS_ENDPOINT_URL={shlex.quote(endpoint)}"
    cmd = f"{flags} {shlex.quote(image)} python -m infra.sync --log-dir {contract.LOG_DIR} --s3 {shlex.quote(url)}"
    res = run(conn, cmd, warn=True)
    if res.failed:
        raise UserError(f"could not start the S3 sidecar on {conn.host}: {' '.join(res.stderr.split())[:300]}")
    out.write(f"sidecar {name} uploads each new checkpoint to {url}\n")
    return name


def launch(opts: LaunchOptions, out=sys.stdout) -> int:
    if not opts.hosts:
        raise UserError("no box given: pass --host ubuntu@IP (or --hosts ubuntu@A,ubuntu@B for several)")
    if opts.sync_s3:
        from infra.s3 import parse_s3_url

        parse_s3_url(opts.sync_s3)  # a typo fails before anything happens on the box
    conns = [opts.ssh.connect(h) for h in opts.hosts]
    try:
        return _launch(opts, conns, out)
    finally:
        for c in conns:
            c.close()


def _launch(opts: LaunchOptions, conns, out) -> int:
    boxes = [preflight(c, fs=opts.fs, data_dir=opts.data_dir, weights_dir=opts.weights_dir, allow_cpu=opts.allow_cpu) for c in conns]
    out.write(table(boxes) + "\n")
    if not opts.restart:
        for conn, box in zip(conns, boxes, strict=True):
            refuse_if_active(conn, box.docker)
    images = [ensure_image(conn, box.docker, image=opts.image, ship=opts.ship, build_args=opts.build_args, wheels=opts.wheels, out=out)
              for conn, box in zip(conns, boxes, strict=True)]
    for conn, box, image in zip(conns, boxes, images, strict=True):
        ensure_data(conn, box, image, opts.job, out=out)
    if opts.sync_s3:
        start_sidecar(conns[0], boxes[0], images[0], opts.sync_s3, opts.s3_endpoint, out=out)
    if opts.restart:  # stopped only now, with the new image and data ready: the least time without training
        for conn, box in zip(conns, boxes, strict=True):
            for c in running(conn, box.docker):
                stop_container(conn, box.docker, c["name"], out=out)
    nnodes = len(conns)
    master = (opts.master_addr or conns[0].host, opts.master_port)
    names = [start(conn, box, image, opts.job, nnodes=nnodes, node_rank=rank, master=master, out=out)
             for rank, (conn, box, image) in enumerate(zip(conns, boxes, images, strict=True))]
    target = f"{conns[0].user}@{conns[0].host}" + (f":{conns[0].port}" if conns[0].port != 22 else "")
    if opts.detach:
        out.write(hint(target) + "\n")
        return 0
    return follow(conns[0], boxes[0].docker, names[0], target, out=out)


def follow(conn, docker: str, name: str, target: str, tail: int | str = "all", out=sys.stdout) -> int:
    """Stream until the container exits; Ctrl-C or a dropped connection only stop the streaming."""
    try:
        stream_logs(conn, docker, name, tail=tail, out=out)
    except KeyboardInterrupt:
        out.write("\nstopped streaming (Ctrl-C). " + hint(target) + "\n")
        return 0
    except ConnectionLost as e:
        raise UserError(f"{e}; " + hint(target)) from None
    code = exit_code(conn, docker, name)
    if code is None:  # `docker logs -f` ended but the container did not (log rotation, daemon restart)
        out.write(hint(target) + "\n")
        return 0
    if code != 0:
        raise UserError(f"training on {conn.host} exited with status {code}: the log is above; fix the cause and launch again (it resumes)")
    out.write(f"training finished on {conn.host}: fetch the weights with `fab fetch-weights --host {target}`\n")
    return 0
