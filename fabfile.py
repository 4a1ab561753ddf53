"""Laptop-side tasks (`fab --list`). Each task is a thin wrapper over plain functions in infra/ that take a
Connection; those functions are what the tests call directly.

    fab launch --host ubuntu@IP [--fs NAME] [--recipe gpt2|speedrun] [--preset gpt2] [--steps N] [--sync-s3 s3://B/P] [--dry-run] ...
    fab logs --host ubuntu@IP [--tail 100]      fab status --host ubuntu@IP      fab stop --host ubuntu@IP
    fab fetch-weights --host ubuntu@IP [--to DIR] [--latest-only] [--s3 s3://B/P]
    fab dashboard --host ubuntu@IP [--local-port 6006]
"""

from __future__ import annotations

import re
import shlex
import sys

from fabric import task
from fabric.main import program as fabric_program

from infra.cloud_tasks import instances, provision, terminate, types  # noqa: F401 (Lambda Cloud tasks, listed by fab --list)
from job.errors import UserError, check_output_path, cli_main, number

SSH_HELP = {
    "key": "SSH private key (default: agent / ~/.ssh)",
    "port": "SSH port (default 22)",
    "known_hosts": "known_hosts file (default ~/.ssh/known_hosts)",
    "accept_new_host_key": "trust a box seen for the first time and remember its key (like OpenSSH accept-new)",
}


def _ssh(key, port, known_hosts, accept_new_host_key):
    from infra.launch import SSHOptions

    return SSHOptions(key=key, port=number(port, "--port", minimum=1, maximum=65535) if port else None, known_hosts=known_hosts,
                      accept_new_host_key=accept_new_host_key)


def _hosts(host: str, hosts: str) -> list[str]:
    if host and hosts:
        raise UserError("give --host for one box or --hosts A,B for several, not both")
    return [h.strip() for h in (hosts or host or "").split(",") if h.strip()]


def _split(values: str, flag: str) -> list[str]:
    """A quoted flag value split as a shell would, or one line for a quote left open."""
    try:
        return shlex.split(values or "")
    except ValueError as e:  # shlex's own words: "No closing quotation", "No escaped character"
        raise UserError(f"{flag} {values!r} cannot be split into words ({e}): it is split like a shell command line, "
                        "so close the quote (or escape it with a backslash)") from None


def _pairs(values: str, flag: str) -> dict[str, str]:
    out = {}
    for item in _split(values, flag):
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UserError(f"{flag} takes KEY=VALUE pairs separated by spaces, got {item!r}")
        out[k] = v
    return out


@task(help={
    "host": "the box, e.g. ubuntu@203.0.113.7",
    "hosts": "several boxes for one multi-node run: ubuntu@A,ubuntu@B (the first is node 0 and holds the checkpoints)",
    **SSH_HELP,
    "image": "REGISTRY/NAME:TAG to docker pull on the box (default: build the image there from this source)",
    "ship": "docker save the local image and load it on the box (small or offline boxes)",
    "build_arg": "extra docker build args for the build on the box, e.g. 'BASE_IMAGE=...'",
    "wheels": "a local directory of .whl files to install in the image built on the box",
    "fs": "name of the Lambda persistent filesystem to keep data on (mounted at /persistent)",
    "data_dir": "a directory on the box instead of --fs (default ~/nanogpt-data)",
    "weights_dir": "the box's dir for checkpoints and logs, mounted at /app/log (default ~/model_weights)",
    "nproc": "trainer processes per box (default: one per GPU)",
    "preset": "model/training preset: gpt2 (default), tiny, ...",
    "recipe": "training recipe: gpt2 (default; build-nanogpt's, on FineWeb-edu) or speedrun (modded-nanogpt's, on FineWeb)",
    "data": "where missing shards come from: hub (default: the recipe's corpus, already tokenized, in minutes), tokenize "
            "(made from text on the box, an hour), bundled (the tiny preset's default: the bundled corpus)",
    "steps": "number of optimizer steps (default: the preset's)",
    "train_args": "more trainer flags, quoted: '--eval-every 100 --checkpoint-every 500'",
    "env": "environment for the trainer, quoted: 'NCCL_DEBUG=INFO'",
    "allow_cpu": "train on the CPUs when the box has no GPU",
    "detach": "start and return, without streaming the log",
    "restart": "stop the active run (with a checkpoint) and start again",
    "sync_s3": "s3://BUCKET/PREFIX: a sidecar on the box uploads each checkpoint as soon as it is saved",
    "s3_endpoint": "S3-compatible endpoint URL for --sync-s3 (default: AWS)",
    "master_addr": "multi-node: the first host's address as the others reach it (default: as given in --hosts)",
    "master_port": "multi-node: rendezvous port on the first host (default 29500)",
    "provision": "create the box on Lambda Cloud first (with --type, --ssh-key; shows the price and asks)",
    "type": "--provision: instance type, e.g. gpu_8x_h100_sxm5 (fab types)",
    "region": "--provision: region, or auto (one with capacity now)",
    "ssh_key": "--provision: the name of your SSH key in Lambda Cloud",
    "name": "--provision: instance name",
    "ssh_user": "--provision: login user on the new box (default ubuntu)",
    "yes": "--provision: do not ask before launching the instance",
    "step_seconds": "--provision: seconds per step for the cost estimate (default: measured or assumed per GPU type)",
    "terminate_when_done": "terminate the instance once training ends and the final checkpoint is in S3 or on this disk",
    "max_hours": "stop training with a checkpoint after H hours, then terminate (needs the final checkpoint safe, as above)",
    "fetch_to": "--terminate-when-done without --sync-s3: where the weights come before terminating (default ./model_weights)",
    "api_key_file": "Lambda API key file, mode 600 (default ~/.config/lambda/api_key; LAMBDA_API_KEY wins)",
    "api_base": "Lambda API base URL (default https://cloud.lambdalabs.com/api/v1, or LAMBDA_API_BASE)",
    "guard_poll": "seconds between the cost guard's looks at the run (default 30)",
    "cuda": "CUDA flavour of torch for the image: cu130, cu128, cu126 (default: the newest the box's driver runs)",
    "dry_run": "connect, check the box and print the plan (image, data, container, cost); change nothing",
})
def launch(c, host="", hosts="", key=None, port=None, known_hosts=None, accept_new_host_key=False, image=None, ship=False,
           build_arg="", wheels=None, fs=None, data_dir=None, weights_dir="~/model_weights", nproc=None, preset="gpt2", steps=None,
           train_args="", env="", allow_cpu=False, detach=False, restart=False, sync_s3=None, s3_endpoint=None, master_addr=None,
           master_port="29500", provision=False, type="", region="auto", ssh_key="", name=None, ssh_user="ubuntu", yes=False,  # noqa: F811
           step_seconds=None, terminate_when_done=False, max_hours=None, fetch_to="model_weights", api_key_file=None, api_base=None,
           guard_poll="30", recipe="gpt2", data=None, cuda=None, dry_run=False):
    """Check and prepare the box, start training in the container, stream its log (Ctrl-C detaches)."""
    import os

    from infra.container import Job
    from infra.launch import CloudOptions, LaunchOptions
    from infra.launch import launch as do_launch
    from job.sidecar.lambda_cloud import check_base_url
    from job.sidecar.s3 import check_endpoint

    @cli_main
    def go():
        def maybe(value, flag, cast=int, minimum=1):
            return number(value, flag, cast, minimum) if value not in (None, "", "auto") else None

        api = api_base or os.environ.get("LAMBDA_API_BASE")
        if api:
            check_base_url(api)  # a typo fails now, not when the cost guard first calls the API
        check_endpoint(s3_endpoint)  # used on the box: checked here, before anything happens there
        if cuda:
            from infra.flavour import by_name

            by_name(cuda)  # a flavour that does not exist fails before connecting
        job = Job(preset=preset, steps=maybe(steps, "--steps"), nproc=maybe(nproc, "--nproc"),
                  trainer_args=_split(train_args, "--train-args"), env=_pairs(env, "--env"), recipe=recipe, data=data or None)
        cloud = CloudOptions(provision=provision, type_name=type, region=region, ssh_key=ssh_key, name=name, ssh_user=ssh_user,
                             yes=yes, terminate_when_done=terminate_when_done, max_hours=maybe(max_hours, "--max-hours", float, 0),
                             api_key_file=api_key_file, api_base=api,
                             guard_poll_seconds=number(guard_poll, "--guard-poll", float, minimum=0.1),
                             step_seconds=maybe(step_seconds, "--step-seconds", float, 0))
        opts = LaunchOptions(hosts=_hosts(host, hosts), ssh=_ssh(key, port, known_hosts, accept_new_host_key), job=job, image=image,
                             ship=ship, build_args=_pairs(build_arg, "--build-arg"), wheels=wheels, fs=fs, data_dir=data_dir,
                             weights_dir=weights_dir, allow_cpu=allow_cpu, detach=detach, restart=restart, sync_s3=sync_s3,
                             s3_endpoint=s3_endpoint, master_addr=master_addr,
                             master_port=number(master_port, "--master-port", minimum=1, maximum=65535),
                             fetch_to=fetch_to, cloud=cloud, cuda=cuda, dry_run=dry_run)
        raise SystemExit(do_launch(opts))

    go()


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
    from pathlib import Path

    from infra.fetch import fetch_weights as fetch
    from job.sidecar.s3 import check_endpoint, client, parse_s3_url, upload_files

    @cli_main
    def go():
        check_output_path(to, "--to", directory=True)  # before connecting: a --to that cannot be written fails now
        if s3:
            parse_s3_url(s3)  # a typo fails before any transfer
            check_endpoint(s3_endpoint)
        with _ssh(key, port, known_hosts, accept_new_host_key).connect(host) as conn:
            report = fetch(conn, weights_dir, to, latest_only=latest_only)
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
