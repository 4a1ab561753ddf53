"""Laptop-side tasks (`fab --list`). Each task is a thin wrapper over plain functions in infra/ that take a
Connection; those functions are what the tests call directly.

    fab launch --host ubuntu@IP [--fs NAME] [--recipe gpt2|speedrun] [--preset gpt2] [--steps N] [--sync-s3 s3://B/P] [--dry-run] ...
    fab logs --host ubuntu@IP [--tail 100]      fab status --host ubuntu@IP      fab stop --host ubuntu@IP
    fab fetch-weights --host ubuntu@IP [--to DIR] [--latest-only] [--s3 s3://B/P]
    fab dashboard --host ubuntu@IP [--local-port 6006]
"""

from __future__ import annotations

import re
import sys

from fabric import task
from fabric.main import program as fabric_program

from infra.cloud_tasks import instances, provision, terminate, types  # noqa: F401 (Lambda Cloud tasks, listed by fab --list)
from infra.flags import fab_help, fab_signature, from_flags
from infra.options import LaunchOptions, SSHOptions
from job.errors import UserError, check_output_path, cli_main, number

SSH_HELP = fab_help(SSHOptions)


def _ssh(key, port, known_hosts, accept_new_host_key) -> SSHOptions:
    return from_flags(SSHOptions, dict(key=key, port=port, known_hosts=known_hosts, accept_new_host_key=accept_new_host_key))


def _hosts(host: str, hosts: str) -> list[str]:
    if host and hosts:
        raise UserError("give --host for one box or --hosts A,B for several, not both")
    return [h.strip() for h in (hosts or host or "").split(",") if h.strip()]


def _launch(c, **flags):
    """Check and prepare the box, start training in the container, stream its log (Ctrl-C detaches)."""
    from infra.launch import launch as do_launch

    cli_main(lambda: sys.exit(do_launch(from_flags(LaunchOptions, flags))))()


# Every flag is a field of LaunchOptions or of the classes it holds (infra/options.py, the Job): its help and its parsing
# are defined there, once.
_launch.__signature__ = fab_signature(LaunchOptions)
launch = task(help=fab_help(LaunchOptions), name="launch", auto_shortflags=False)(_launch)


@task(help={"host": "the box, e.g. ubuntu@203.0.113.7", "tail": "start with the last N lines (default 100; 'all')",
            "no_follow": "print and return instead of following", **SSH_HELP})
def logs(c, host="", tail="100", no_follow=False, key=None, port=None, known_hosts=None, accept_new_host_key=False):
    """Re-attach to the training log (Ctrl-C detaches; training goes on)."""
    from infra.box import find_docker
    from infra.container import find_train_container, stream_logs
    from infra.launch import follow

    @cli_main
    def go():
        lines = tail if tail == "all" else number(tail, "--tail")  # before connecting
        with _ssh(key, port, known_hosts, accept_new_host_key).connect(host) as conn:
            docker = find_docker(conn)
            name = find_train_container(conn, docker)["name"]
            if no_follow:
                stream_logs(conn, docker, name, tail=lines, follow=False)
            else:
                raise SystemExit(follow(conn, docker, name, host, tail=lines))

    go()


@task(help={"host": "the box, e.g. ubuntu@203.0.113.7", **SSH_HELP})
def status(c, host="", key=None, port=None, known_hosts=None, accept_new_host_key=False):
    """Is it running? step, loss, tok/s, ETA, newest checkpoint, GPU use."""
    from infra.box import find_docker
    from infra.container import format_status
    from infra.container import status as get_status

    @cli_main
    def go():
        with _ssh(key, port, known_hosts, accept_new_host_key).connect(host) as conn:
            print(format_status(get_status(conn, find_docker(conn))))

    go()


@task(help={"host": "the box", "hosts": "all boxes of a multi-node run: ubuntu@A,ubuntu@B",
            "timeout": "seconds to wait for the final checkpoint before killing (default 300)", **SSH_HELP})
def stop(c, host="", hosts="", timeout="300", key=None, port=None, known_hosts=None, accept_new_host_key=False):
    """Stop training with a checkpoint (SIGTERM, then wait), then the S3 sidecar after its last upload."""
    from infra.box import find_docker
    from infra.container import newest_checkpoint, running, stop_container

    @cli_main
    def go():
        ssh, wait_s = _ssh(key, port, known_hosts, accept_new_host_key), number(timeout, "--timeout")
        for h in _hosts(host, hosts):
            with ssh.connect(h) as conn:
                docker = find_docker(conn)
                # A stop by hand is a pause, not "training done": the cost guard must not terminate the box now.
                for ct in running(conn, docker, role="guard"):
                    stop_container(conn, docker, ct["name"], timeout=30)
                    print("the cost guard is stopped too: `fab launch` again re-arms it, `fab terminate` ends the box")
                active = running(conn, docker)
                if not active:
                    print(f"no training running on {conn.host}")
                for ct in active:
                    stop_container(conn, docker, ct["name"], timeout=wait_s)
                for ct in running(conn, docker, role="sync"):
                    stop_container(conn, docker, ct["name"], timeout=600)
                for ct in active:
                    print(f"stopped {ct['name']} on {conn.host}; newest checkpoint: {newest_checkpoint(conn, docker, ct['name']) or 'none'}")

    go()


@task(help={
    "host": "the box, e.g. ubuntu@203.0.113.7",
    "to": "local directory (default ./model_weights)",
    "weights_dir": "the box's weights dir (default ~/model_weights)",
    "latest_only": "only the newest checkpoint (plus logs)",
    **SSH_HELP,
    "s3": "also upload them to s3://BUCKET/PREFIX (AWS credentials from the usual chain)",
    "s3_endpoint": "S3-compatible endpoint URL (default: AWS, or AWS_ENDPOINT_URL)",
})
def fetch_weights(c, host="", to="model_weights", weights_dir="model_weights", latest_only=False, key=None, port=None,
                  known_hosts=None, accept_new_host_key=False, s3=None, s3_endpoint=None):
    """Copy checkpoints and logs from the box (incremental, resumable, sha256-verified), optionally on to S3."""
    from functools import partial
    from pathlib import Path

    from infra.fetch import connect_and_fetch
    from job.sidecar.s3 import check_endpoint, client, parse_s3_url, upload_files

    @cli_main
    def go():
        check_output_path(to, "--to", directory=True)  # before connecting: a --to that cannot be written fails now
        if s3:
            parse_s3_url(s3)  # a typo fails before any transfer
            check_endpoint(s3_endpoint)
        report = connect_and_fetch(partial(_ssh(key, port, known_hosts, accept_new_host_key).connect, host), weights_dir, to,
                                   latest_only=latest_only)
        print(f"fetched {len(report.copied)} files ({report.bytes_transferred / 2**20:.1f} MiB) to {to}, "
              f"{len(report.skipped)} already complete")
        if s3:
            up = upload_files([Path(to) / n for n in report.copied + report.skipped], s3, s3=client(s3_endpoint))
            print(f"uploaded {len(up.uploaded)} files to {s3}, {len(up.skipped)} already there")

    go()


@task(help={"host": "the box, e.g. ubuntu@203.0.113.7", **SSH_HELP,
            "local_port": "the port on this machine's loopback for the browser (default 6006; 0 picks a free one)",
            "remote_port": "the port TensorBoard listens on, on the box's loopback (default 6006)"})
def dashboard(c, host="", key=None, port=None, known_hosts=None, accept_new_host_key=False, local_port="6006", remote_port="6006"):
    """The run's TensorBoard on the box, forwarded over SSH to http://127.0.0.1:PORT/ here (Ctrl-C closes it)."""
    from infra.box import find_docker
    from infra.dashboard import dashboard as serve

    @cli_main
    def go():
        local = number(local_port, "--local-port", minimum=0, maximum=65535)
        remote = number(remote_port, "--remote-port", minimum=1, maximum=65535)
        with _ssh(key, port, known_hosts, accept_new_host_key).connect(host) as conn:
            serve(conn, find_docker(conn), local, remote)

    go()


def _parse_errors_as_one_line(program) -> None:
    """Invoke reports its own parse errors (an unknown task or flag, a flag without its value) as a bare line with exit
    status 1; here, as for every other mistake, they are one `error:` line with the fix and status 2. Fabric imports
    this file in the middle of parsing, so the parsing steps still to come are wrapped on the running program."""
    from invoke.exceptions import Exit, ParseError

    def one_line(step):
        def run(*args, **kwargs):
            try:
                return step(*args, **kwargs)
            except ParseError as e:
                task_name = getattr(e.context, "name", None)
                see = f"`fab --help {task_name}` lists its flags" if task_name else "`fab --list` lists the tasks"
                # Invoke names a flag by its repr, <Argument: host (h)>: say --host
                said = re.sub(r"<Argument: (\w+)[^>]*>", lambda m: "--" + m.group(1).replace("_", "-"), str(e))
                print(f"error: {said} ({see})", file=sys.stderr, flush=True)
            except Exit as e:
                if not (e.message and e.code):
                    raise
                print(f"error: {e.message} (`fab --list` lists the tasks)", file=sys.stderr, flush=True)
            sys.exit(UserError.exit_code)

        return run

    for name in ("parse_collection", "parse_tasks", "parse_cleanup"):
        setattr(program, name, one_line(getattr(program, name)))


_parse_errors_as_one_line(fabric_program)  # the program that is loading this file
