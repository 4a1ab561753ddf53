"""`fab launch`: connect, preflight, image, data, sidecar, run, stream; one or several boxes.

The launch is one list of steps (STEPS), each paired with its plan (infra/plan.py): `--dry-run` runs the plans
instead, so what it prints is what the same steps would do. Each step is idempotent (re-running launch after a
failure redoes only what is missing) and fails with one line. The trainer resumes from the newest checkpoint in the
weights dir by itself (--resume auto).
"""

from __future__ import annotations

import io
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra import plan
from infra.box import Box, preflight, table
from infra.container import (
    PREPARE_CONTAINER,
    ROLE,
    containers,
    docker_base,
    exit_code,
    refuse_if_active,
    running,
    shards_ready,
    start,
    start_data,
    stop_container,
    stream_logs,
    wait_data,
)
from infra.credentials import (
    LAMBDA_KEY,
    aws_credentials_file,
    check_wandb_key,
    hf_token,
    send_aws_credentials,
    send_hf_token,
    send_secret,
    send_wandb_key,
)
from infra.flavour import Flavour, choose_flavour
from infra.image import build_data_on_box, built_tags, ensure_image, image_id, pull_data_image, pull_images
from infra.options import CloudOptions, LaunchOptions, SSHOptions  # noqa: F401 (the options live there)
from infra.ssh import ConnectionLost, run, stream
from infra.timeline import Timeline, bill_line, path_on_box, trainer_stages
from job import contract
from job.errors import UserError

SECRET_MOUNT = "/run/nanogpt/aws-credentials"
LAMBDA_KEY_MOUNT = "/run/nanogpt/lambda-api-key"
# The programs that run on the box beside the trainer, in containers of the same image (job/sidecar/).
SYNC_MODULE = "job.sidecar.sync"
GUARD_MODULE = "job.sidecar.guard"


def hint(host: str) -> str:
    return (f"training goes on on {host}. Re-attach: fab logs --host {host}   status: fab status --host {host}   "
            f"stop (with a checkpoint): fab stop --host {host}")


# What to do after a trainer container's non-zero exit status; what the status means is job.contract's table.
NEXT_STEP = {
    contract.EXIT_DIVERGED: "launch again with the lower learning rate the error above names for this recipe, in --train-args; it "
                            "resumes from the last good checkpoint (the error above names it)",
    contract.EXIT_USER_ERROR: "fix what the error above names and launch again; it resumes from the newest checkpoint",
    contract.EXIT_RANK_LOST: "launch again; it resumes from the last checkpoint (the error above names it and the rank)",
}


def failure_advice(host: str, code: int) -> str:
    """One line for a trainer container's non-zero exit status: what it means (job.contract.EXIT_STATUSES) and what to do."""
    then = NEXT_STEP.get(code, "the log is above; fix the cause and launch again (it resumes from the newest checkpoint)")
    return f"training on {host} exited with status {code}: {contract.exit_meaning(code)}; {then}"


def sidecar_flags(box: Box, name: str, role: str) -> str:
    """A helper container beside the trainer: the weights dir mounted, no GPU, the host's network (S3, the API)."""
    return docker_base(box, detach=True, name=name, labels={ROLE: role}, network_host=True, gpus=False)


def start_sidecar(conn, box: Box, image: str, url: str, endpoint: str | None, out=sys.stdout) -> str:
    """Replace any sidecar of an earlier launch (it finishes its pass on SIGTERM) and start a new one."""
    for c in running(conn, box.docker, role="sync"):
        stop_container(conn, box.docker, c["name"], timeout=120, out=out)
    name = f"{contract.CONTAINER_NAME}-sync"
    run(conn, f"{box.docker} rm -f {name} >/dev/null 2>&1", warn=True)
    creds = send_aws_credentials(conn)
    flags = sidecar_flags(box, name, "sync") + f" -v {shlex.quote(f'{creds}:{SECRET_MOUNT}:ro')} -e AWS_SHARED_CREDENTIALS_FILE={SECRET_MOUNT}"
    if endpoint:
        flags += f" -e AWS_ENDPOINT_URL={shlex.quote(endpoint)}"
    cmd = f"{flags} {shlex.quote(image)} python -m {SYNC_MODULE} --log-dir {contract.LOG_DIR} --s3 {shlex.quote(url)}"
    res = run(conn, cmd, warn=True)
    if res.failed:
        raise UserError(f"could not start the S3 sidecar on {conn.host}: {' '.join(res.stderr.split())[:300]}")
    out.write(f"sidecar {name} uploads each new checkpoint to {url}\n")
    return name


def start_guard(conn, box: Box, image: str, instance_id: str, cloud: CloudOptions, api_key: str, sync_s3: str | None,
                s3_endpoint: str | None, out=sys.stdout) -> str:
    """The cost guard in its own container (see job/sidecar/guard.py): it terminates this instance once training is over
    and the final checkpoint is safe, or stops the run at --max-hours. It runs on the box, so closing the laptop
    changes nothing. The API key reaches it as a 0600 file mounted read-only, never as an environment variable."""
    for c in containers(conn, box.docker, role="guard", all_states=True):
        run(conn, f"{box.docker} rm -f {shlex.quote(c['name'])}", warn=True)
    key_file = send_secret(conn, LAMBDA_KEY, api_key.encode())
    name = f"{contract.CONTAINER_NAME}-guard"
    flags = sidecar_flags(box, name, "guard") + f" -v {shlex.quote(f'{key_file}:{LAMBDA_KEY_MOUNT}:ro')}"
    args = ["python", "-m", GUARD_MODULE, "--instance-id", instance_id, "--log-dir", contract.LOG_DIR, "--api-key-file", LAMBDA_KEY_MOUNT,
            "--poll-seconds", str(cloud.guard_poll_seconds)]
    if cloud.api_base:
        args += ["--api-base", cloud.api_base]
    if cloud.terminate_when_done:
        args.append("--terminate-when-done")
    if cloud.max_hours is not None:
        args += ["--max-hours", str(cloud.max_hours)]
    if sync_s3:
        args += ["--s3", sync_s3] + (["--s3-endpoint", s3_endpoint] if s3_endpoint else [])
        flags += f" -v {shlex.quote(f'{send_aws_credentials(conn)}:{SECRET_MOUNT}:ro')} -e AWS_SHARED_CREDENTIALS_FILE={SECRET_MOUNT}"
    res = run(conn, f"{flags} {shlex.quote(image)} {' '.join(shlex.quote(a) for a in args)}", warn=True)
    if res.failed:
        raise UserError(f"could not start the cost guard on {conn.host}: {' '.join(res.stderr.split())[:300]}")
    what = [w for w, on in (("terminates the instance once training is over and the final checkpoint is safe", cloud.terminate_when_done),
                            (f"stops training after {cloud.max_hours:g} h" if cloud.max_hours is not None else "", cloud.max_hours is not None))
            if on]
    out.write(f"cost guard {name} on the box {' and '.join(what)}\n")
    return name


def clear_run_markers(conn, box: Box) -> None:
    """A new run starts without an earlier run's exit status or stop request (the guard's file contract)."""
    w = shlex.quote(box.weights_dir)
    done = contract.TRAIN_EXIT_FILE
    run(conn, f"rm -f {w}/{done} {w}/{done}.tmp {w}/{contract.STOP_REQUEST_FILE}", warn=True)


def watch_exit(conn, box: Box, name: str) -> None:
    """On the box, outliving this SSH session: write the trainer container's exit status to .train-exit when it
    ends, so the guard also sees a crash that logged no "end"."""
    final = shlex.quote(f"{box.weights_dir}/{contract.TRAIN_EXIT_FILE}")
    inner = f"{box.docker} wait {shlex.quote(name)} > {final}.tmp && mv {final}.tmp {final}"
    run(conn, f"setsid nohup sh -c {shlex.quote(inner)} >/dev/null 2>&1 < /dev/null &", warn=True)


def provision_box(opts: LaunchOptions, out=sys.stdout, timeline: Timeline | None = None) -> tuple[str, str, str, int]:
    """--provision: show the price and the estimated cost, ask, launch, wait for SSH. Returns (user@ip, instance id, key,
    price in cents per hour). The timeline's boot stage starts once the launch is confirmed: billing starts there."""
    from infra.cloud import confirm, cost_line, dollars, plan_provision, price_basis, provision
    from job.sidecar.lambda_cloud import LambdaCloud, load_api_key

    cloud = opts.cloud
    key = load_api_key(cloud.api_key_file)
    api = LambdaCloud(key, cloud.api_base)
    plan = plan_provision(api, cloud.type_name, cloud.region, cloud.ssh_key, opts.fs)
    opts.job.check_world([plan.gpus])  # the trainer's settings for this type's GPUs, before anything is billed
    step_seconds, basis = price_basis(opts.job, plan.type_name, cloud.step_seconds)
    out.write(cost_line(plan, opts.job.run_steps(), step_seconds, basis=basis, tokens_per_step=opts.job.tokens_per_step(),
                        setup=local_timeline(opts, plan.type_name)) + "\n")
    if plan.create_fs:
        out.write(plan.fs_line() + "\n")
    confirm(f"Launch {plan.type_name} in {plan.region} at {dollars(plan.price_cents)}/hour, billed until terminated?", cloud.yes)
    if timeline is not None:
        timeline.type_name = plan.type_name
    with timeline.timed("boot") if timeline is not None else nullcontext():
        inst = provision(api, plan=plan, name=cloud.name, ssh_port=opts.ssh.port or 22, out=out)
    return f"{cloud.ssh_user}@{inst['ip']}", inst["id"], key, plan.price_cents


def local_timeline(opts: LaunchOptions, type_name: str | None) -> Timeline | None:
    """The timeline a launch left in --fetch-to (it fetched the weights home), if it was measured on this kind of run."""
    from infra.timeline import local_path

    try:
        tl = Timeline.from_json(local_path(Path(opts.fetch_to)).read_text())
    except (OSError, UnicodeDecodeError):  # none, or not readable: it is only a hint, the assumed setup stands
        tl = None
    return tl if tl and tl.matches(opts.job.recipe, opts.job.preset, type_name) else None


def launch(opts: LaunchOptions, out=sys.stdout) -> int:
    cloud = opts.cloud
    check_wandb_key(opts.job)
    if opts.job.data == "hub":
        hf_token()  # a token file that cannot be sent is one line here, not after the image is built on the box
    if opts.sync_s3:
        from job.sidecar.s3 import parse_s3_url

        parse_s3_url(opts.sync_s3)  # a typo, or no credentials, fails before anything happens on the box
        aws_credentials_file()
    if cloud.guarded and len(opts.hosts) > 1:
        raise UserError("--terminate-when-done / --max-hours guard one instance: use them with --host (or --provision), not --hosts")
    instance_id = api_key = price = None
    timeline = Timeline(opts.job.recipe, opts.job.preset)
    if cloud.provision:
        if opts.hosts:
            raise UserError("--provision creates the box: leave out --host/--hosts")
        if opts.dry_run:
            return dry_run_provision(opts, out)
        host, instance_id, api_key, price = provision_box(opts, out, timeline)
        opts.hosts = [host]
        # A box created a minute ago has a host key nobody could have checked: record it on first contact (accept-new),
        # and say so. A key that changes later is still refused.
        opts.ssh.accept_new_host_key = True
        out.write(f"first contact with {host}: its SSH host key is recorded in known_hosts (accept-new)\n")
    if not opts.hosts:
        raise UserError("no box given: pass --host ubuntu@IP (or --hosts ubuntu@A,ubuntu@B for several, or --provision)")
    if opts.dry_run:
        return dry_run(opts, out)
    if cloud.guarded and instance_id is None:
        from infra.cloud import instance_id_for
        from job.sidecar.lambda_cloud import load_api_key

        api_key = load_api_key(cloud.api_key_file)
        instance_id = instance_id_for(opts.hosts[0], api_key, cloud.api_base)
    try:
        conns = [opts.ssh.connect(h) for h in opts.hosts]
        try:
            return _launch(opts, conns, out, instance_id, api_key, timeline, price)
        finally:
            for c in conns:
                c.close()
    except UserError as e:
        if cloud.provision:  # never leave a billed box behind without saying so
            raise UserError(f"{e} -- instance {instance_id} is still running and billed: fix the cause and `fab launch --host "
                            f"{opts.hosts[0]}` again, or `fab terminate --id {instance_id}`") from None
        raise


def dry_run_provision(opts: LaunchOptions, out) -> int:
    """--dry-run --provision: the instance type, region and cost estimate; nothing is created, so no box to look at."""
    from infra.cloud import cost_line, plan_provision, price_basis
    from infra.plan import cost_split
    from job.sidecar.lambda_cloud import LambdaCloud, load_api_key

    cloud = opts.cloud
    plan = plan_provision(LambdaCloud(load_api_key(cloud.api_key_file), cloud.api_base), cloud.type_name, cloud.region, cloud.ssh_key, opts.fs)
    opts.job.check_world([plan.gpus])
    step_seconds, basis = price_basis(opts.job, plan.type_name, cloud.step_seconds)
    tl = local_timeline(opts, plan.type_name)
    line = cost_line(plan, opts.job.run_steps(), step_seconds, basis=basis, tokens_per_step=opts.job.tokens_per_step(), setup=tl)
    if plan.create_fs:
        out.write(plan.fs_line(dry=True) + "\n")
    split = cost_split(plan, opts.job, step_seconds, basis, tl)
    out.write(f"plan (dry run: no instance launched): {line}\n" + "".join(f"  {s}\n" for s in split) +
              "the box's own plan (driver, CUDA flavour, image, data) needs the box: `fab launch --dry-run --host ubuntu@IP` once it runs\n")
    return 0


# ---- the launch: one list of steps, run to do the work or, in a dry run, to say what each would do ----------------
@dataclass
class LaunchRun:
    """What the launch's steps share. In a dry run (`dry`) each step's plan runs instead of the step: it looks and
    says, per node, what the step would do (infra/plan.py), and changes nothing on the box."""

    opts: LaunchOptions
    conns: list
    out: Any = sys.stdout
    dry: bool = False
    instance_id: str | None = None
    api_key: str | None = None
    boxes: list[Box] = field(default_factory=list)
    flavour: Flavour | None = None
    images: list[str] = field(default_factory=list)  # per node: the image reference the containers run
    names: list[str] = field(default_factory=list)  # per node: the trainer container
    lines: dict[int, list[str]] = field(default_factory=dict)  # the dry run's lines, per node
    timeline: Timeline | None = None  # the launch's stages, timed as they run (not in a dry run)
    data: dict[int, float] = field(default_factory=dict)  # per node: when its data preparation started (monotonic)
    data_later: set[int] = field(default_factory=set)  # nodes whose preparation waits for the trainer image
    data_followed: set[int] = field(default_factory=set)  # nodes whose preparation the launch followed to its end

    @property
    def nodes(self) -> list[tuple[object, Box]]:
        return list(zip(self.conns, self.boxes, strict=True))

    @property
    def master(self) -> tuple[str, int]:
        """Node 0's address and rendezvous port, as the other nodes reach it."""
        return self.opts.master_addr or self.conns[0].host, self.opts.master_port


@dataclass(frozen=True)
class Step:
    name: str
    do: Callable[[LaunchRun], None]
    plan: Callable[[LaunchRun, int], list[str]] | None  # the node's lines of the dry run; None: `do` only looks, run it too
    stage: str | None  # the timeline's stage (infra/timeline.py) this step's time is part of; None: the step times itself


def preflight_boxes(r: LaunchRun) -> None:
    """Every box checked (a dry run creates not even the data and weights dirs), the trainer's settings for the
    boxes' GPUs, and the CUDA flavour their drivers run: all before any build, pull or download."""
    o = r.opts
    r.boxes = [preflight(c, fs=o.fs, data_dir=o.data_dir, weights_dir=o.weights_dir, allow_cpu=o.allow_cpu, create=not r.dry)
               for c in r.conns]
    r.out.write(table(r.boxes) + "\n")
    o.job.check_world([len(b.gpus) for b in r.boxes])
    r.flavour = choose_flavour(r.boxes, o.cuda)  # a driver too old for every flavour fails here


def refuse_active(r: LaunchRun) -> None:
    if not r.opts.restart:
        for conn, box in r.nodes:
            refuse_if_active(conn, box.docker)


def pull(r: LaunchRun) -> None:
    """--image: every node pulls it, by digest. A failed pull leaves r.images empty, and the next step builds."""
    o = r.opts
    if o.image and not o.ship:
        pulled = pull_images([(conn, box.docker) for conn, box in r.nodes], o.image, r.flavour, out=r.out)
        if pulled:
            r.images = [i.ref for i in pulled]
            if r.timeline is not None:
                r.timeline.mark("image", [i.how for i in pulled])


def build_images(r: LaunchRun) -> None:
    """The image built on each box from this source (or shipped with --ship), unless the pull had it."""
    o = r.opts
    if r.images:
        return
    made = [ensure_image(conn, box.docker, flavour=r.flavour, image=o.image if o.ship else None, ship=o.ship, build_args=o.build_args,
                         wheels=o.wheels, out=r.out) for conn, box in r.nodes]
    r.images = [i.ref for i in made]
    if r.timeline is not None:
        r.timeline.mark("image", [i.how for i in made])


def data_image(r: LaunchRun, conn, box: Box) -> str | None:
    """The image to prepare the data in before the trainer image is there: the trainer image when the box has this
    source's build already, else the data image (docker/Dockerfile's data stage: no torch, built in a fraction of the
    trainer's time); with --image, its data image pulled (as push-image pushes it). None where there is none (a
    digest, a registry without it, --ship): the preparation then waits for the trainer image."""
    o = r.opts
    if o.ship:
        return None
    if o.image:
        return pull_data_image(conn, box.docker, o.image, r.flavour, out=r.out)
    trainer, _ = built_tags(r.flavour, o.build_args, o.wheels)
    if image_id(conn, box.docker, trainer):
        return trainer
    return build_data_on_box(conn, box.docker, flavour=r.flavour, build_args=o.build_args, wheels=o.wheels, out=r.out).ref


def start_data_early(r: LaunchRun) -> None:
    """The shards are downloaded or tokenized while the trainer image is built or pulled: started now, in the data
    image (or the trainer image, where the box has it)."""
    t0 = time.monotonic()
    for rank, (conn, box) in enumerate(r.nodes):
        if shards_ready(conn, box, r.opts.job, r.out):
            continue
        started = time.monotonic()
        # The other nodes' data after node 0's: their data dirs may be one shared file system (--fs), which node 0's
        # preparation fills; two preparations must never write the same shards at once.
        image = data_image(r, conn, box) if rank == 0 else None
        if image is None:
            r.data_later.add(rank)
            continue
        r.data[rank] = started
        start_data(conn, box, image, r.opts.job, token_file=lambda c=conn: send_hf_token(c, r.out), out=r.out)
    if r.timeline is not None and not r.data and not r.data_later:
        r.timeline.span("data", t0, time.monotonic())  # only the look: every node has its shards


def prepare_data(r: LaunchRun) -> None:
    """Each node's preparation to its end: the one started before the image, or one in the trainer image now. The
    timeline's data stage runs from the first one's start to the last one's end."""
    for rank, ((conn, box), image) in enumerate(zip(r.nodes, r.images, strict=True)):
        if rank in r.data_later and (rank == 0 or not shards_ready(conn, box, r.opts.job, r.out)):
            r.data[rank] = time.monotonic()
            start_data(conn, box, image, r.opts.job, token_file=lambda c=conn: send_hf_token(c, r.out), out=r.out)
        if rank in r.data:
            r.data_followed.add(rank)  # from here on its end is said, or its failure is the launch's error
            wait_data(conn, box, r.opts.job, r.data[rank], out=r.out)
    if r.timeline is not None and r.data:
        r.timeline.span("data", min(r.data.values()), time.monotonic())


def data_left_running(r: LaunchRun) -> list[str]:
    """After a launch that failed before it followed a preparation it had started (the image failed, Ctrl-C): where
    that preparation goes on. Left to finish, since the next launch needs the same shards: it finds them made, or
    replaces the container and job.prepare resumes where it stopped."""
    return [f"note: the data preparation goes on in the background on {conn.host} (`{box.docker} logs -f {PREPARE_CONTAINER}` "
            "there follows it); the next `fab launch` finds its shards or takes it over where it is\n"
            # strict=False: a launch that failed in preflight has no boxes yet (and no preparation either)
            for rank, (conn, box) in enumerate(zip(r.conns, r.boxes, strict=False)) if rank in r.data and rank not in r.data_followed]


def send_dashboard_key(r: LaunchRun) -> None:
    send_wandb_key(r.conns[0], r.opts.job)  # only node 0's rank 0 writes to W&B


def stop_for_restart(r: LaunchRun) -> None:
    """--restart: the active run stopped only now, with the new image and data ready: the least time without training."""
    if r.opts.restart:
        for conn, box in r.nodes:
            for c in running(conn, box.docker):
                stop_container(conn, box.docker, c["name"], out=r.out)


def sync_sidecar(r: LaunchRun) -> None:
    if r.opts.sync_s3:
        start_sidecar(r.conns[0], r.boxes[0], r.images[0], r.opts.sync_s3, r.opts.s3_endpoint, out=r.out)


def new_run_markers(r: LaunchRun) -> None:
    clear_run_markers(r.conns[0], r.boxes[0])


def cost_guard(r: LaunchRun) -> None:
    o = r.opts
    if o.cloud.guarded:
        start_guard(r.conns[0], r.boxes[0], r.images[0], r.instance_id, o.cloud, r.api_key, o.sync_s3, o.s3_endpoint, out=r.out)


def start_trainers(r: LaunchRun) -> None:
    r.names = [start(conn, box, image, r.opts.job, nnodes=len(r.conns), node_rank=rank, master=r.master, out=r.out)
               for rank, ((conn, box), image) in enumerate(zip(r.nodes, r.images, strict=True))]


def exit_watch(r: LaunchRun) -> None:
    if r.opts.cloud.guarded:
        watch_exit(r.conns[0], r.boxes[0], r.names[0])


STEPS = [
    Step("preflight", preflight_boxes, None, "preflight"),
    Step("active run", refuse_active, plan.plan_active, "preflight"),
    # The data first, in the background (the data image is built in a fraction of the trainer image's time); the
    # trainer image meanwhile; then the data's end. The data stage's time overlaps the image's.
    Step("data start", start_data_early, plan.plan_data, None),
    Step("pull", pull, plan.plan_pull_step, "image"),
    Step("image", build_images, plan.plan_image_step, "image"),
    Step("data", prepare_data, plan.nothing, None),
    # From here on the steps start the run itself: their seconds are the training stage's first ones.
    Step("dashboards", send_dashboard_key, plan.plan_wandb, "training"),
    Step("restart", stop_for_restart, plan.nothing, "training"),  # plan_active's line says what --restart does
    Step("S3 sidecar", sync_sidecar, plan.plan_sidecar, "training"),
    Step("run markers", new_run_markers, plan.nothing, "training"),
    Step("cost guard", cost_guard, plan.plan_guard, "training"),
    Step("trainer", start_trainers, plan.plan_container, "training"),
    Step("exit watch", exit_watch, plan.nothing, "training"),
]


def run_steps(r: LaunchRun) -> None:
    for step in STEPS:
        if r.dry and step.plan is not None:
            for rank in range(len(r.conns)):
                r.lines.setdefault(rank, []).extend(step.plan(r, rank))
        elif r.timeline is not None and step.stage is not None:
            with r.timeline.timed(step.stage):
                step.do(r)
        else:
            step.do(r)


def dry_run(opts: LaunchOptions, out) -> int:
    """--dry-run on boxes that exist: connect, and print what each step of the launch would do, changing nothing."""
    conns = [opts.ssh.connect(h) for h in opts.hosts]
    try:
        r = LaunchRun(opts, conns, out, dry=True)
        run_steps(r)
        lines = []
        for rank, conn in enumerate(conns):
            lines.append(f"{conn.user}@{conn.host}" + (f" (node {rank} of {len(conns)})" if len(conns) > 1 else "") + ":")
            lines += ["  " + line for line in r.lines.get(rank, [])]
        lines += plan.cost_lines(opts, r.boxes, box_timeline(conns[0], r.boxes[0], opts))
        out.write("plan (dry run: nothing was changed on the box):\n" + "\n".join(lines) + "\n")
        return 0
    finally:
        for c in conns:
            c.close()


def box_timeline(conn, box: Box, opts: LaunchOptions) -> Timeline | None:
    """The timeline the last launch left on the box, if it was measured on this kind of run."""
    res = run(conn, f"cat {shlex.quote(path_on_box(box.weights_dir))}", warn=True)
    tl = Timeline.from_json(res.stdout) if res.ok else None
    return tl if tl and tl.matches(opts.job.recipe, opts.job.preset, None) else None


def trainer_timeline(conn, box: Box, tl: Timeline) -> None:
    """Compile and first step from the trainer's metrics.jsonl on the box: its start events, its compile event, and
    the first train event after each start (not every step's line)."""
    prog = ('/"event": "(start|resume)"/ {t = 0; print; next} /"event": "compile"/ {print; next} '
            '/"event": "train"/ {if (!t) {print; t = 1}}')
    res = run(conn, f"awk {shlex.quote(prog)} {shlex.quote(box.weights_dir + '/' + contract.METRICS_FILE)}", warn=True)
    for name, seconds in trainer_stages(res.stdout.splitlines() if res.ok else []).items():
        tl.add(name, seconds)


def keep_timeline(conn, box: Box, tl: Timeline, price: float | None, nodes: int, out) -> None:
    """Print the timeline and the bill, and keep the timeline in the run's log dir on the box (replacing the last one)."""
    if not tl.stages:
        return
    out.write("timeline:\n" + "".join(f"  {line}\n" for line in tl.lines()))
    if price:
        out.write(bill_line(tl, price, nodes, " of this launch") + "\n")
    q = shlex.quote(path_on_box(box.weights_dir))
    if stream(conn, f"cat > {q}.tmp && mv {q}.tmp {q}", out=io.StringIO(), stdin_chunks=[tl.to_json().encode()]) != 0:
        out.write(f"warning: could not keep the timeline in {box.weights_dir} on {conn.host}\n")


def live_price(opts: LaunchOptions, tl: Timeline) -> int | None:
    """The hourly price of the box where it is a Lambda instance of the account's (an API key is at hand), else None."""
    from infra.cloud import instance_for
    from job.sidecar.lambda_cloud import load_api_key

    try:
        inst = instance_for(opts.hosts[0], api_key=load_api_key(opts.cloud.api_key_file), api_base=opts.cloud.api_base)
    except UserError:
        return None
    t = inst.get("instance_type") or {}
    tl.type_name = t.get("name") or tl.type_name
    return int(t.get("price_cents_per_hour") or 0) or None


def _launch(opts: LaunchOptions, conns, out, instance_id: str | None = None, api_key: str | None = None,
            timeline: Timeline | None = None, price: int | None = None) -> int:
    r = LaunchRun(opts, conns, out, instance_id=instance_id, api_key=api_key, timeline=timeline or Timeline(opts.job.recipe, opts.job.preset))
    # The box's price is asked of the cloud API beside the steps, which never wait on it: only the bill at the end does.
    pricing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="price")
    asked = pricing.submit(live_price, opts, r.timeline) if price is None else None
    pricing.shutdown(wait=False)
    try:
        run_steps(r)
    except BaseException:
        r.out.writelines(data_left_running(r))
        raise
    conn0, box0, name0 = conns[0], r.boxes[0], r.names[0]
    tl, t0 = r.timeline, time.monotonic()
    if asked is not None:
        price = asked.result()
    try:
        return _run_and_follow(r, opts, conn0, box0, name0, out)
    finally:  # a run that failed or was detached still shows (and keeps) what was measured
        if opts.detach:
            tl.stages[-1].what = "sidecars and trainer started (detached: training goes on, billed)"
        else:
            tl.add("training", time.monotonic() - t0 - (tl.seconds("fetch") or 0))
        try:
            if not opts.detach:
                trainer_timeline(conn0, box0, tl)
            keep_timeline(conn0, box0, tl, price, len(conns), out)
        except Exception as e:  # a lost connection (any SSH error): the error the run ended with is the one worth its line
            out.write(f"warning: the timeline could not be read or kept on {conn0.host} ({e})\n")
        if tl.seconds("fetch") is not None:  # the weights came home: the timeline goes with them, for the next --provision
            from infra.timeline import local_path

            local_path(Path(opts.fetch_to)).write_text(tl.to_json())


def _run_and_follow(r: LaunchRun, opts: LaunchOptions, conn0, box0: Box, name0: str, out) -> int:
    target = f"{conn0.user}@{conn0.host}" + (f":{conn0.port}" if conn0.port != 22 else "")
    if opts.detach:
        out.write(hint(target) + "\n")
        if opts.job.runs:
            out.write(runs_later(opts, box0, target) + "\n")
        if opts.cloud.terminate_when_done and not opts.sync_s3:
            out.write(f"the instance is terminated once the final checkpoint is safe: run `fab fetch-weights --host {target}` after "
                      "training (it marks what it verified), or launch with --sync-s3 so nothing waits for this laptop\n")
        return 0
    done = None
    if opts.job.runs:  # each run's checkpoints are in its own log dir
        name = contract.RUN_DIR_FORMAT.format(seed="S")
        done = (f"each run's weights are in {box0.weights_dir}/{name}: `fab fetch-weights --host {target} --weights-dir "
                f"{box0.weights_dir}/{name} --to {opts.fetch_to}/{name}` fetches them")
    code = follow(conn0, box0.docker, name0, target, out=out, done=done)
    finished = exit_code(conn0, box0.docker, name0) == 0  # not after Ctrl-C: training still runs
    if opts.job.runs and finished:
        report_runs(conn0, box0, opts, out)
    if opts.cloud.terminate_when_done and not opts.sync_s3 and finished:
        # Without S3 the laptop is the safe place: bring the weights home now; fetch-weights marks each verified
        # checkpoint on the box (.fetched-NAME), which is what lets the guard terminate the instance.
        from infra.fetch import fetch_weights

        t0 = time.monotonic()
        report = fetch_weights(conn0, box0.weights_dir, opts.fetch_to)
        r.timeline.add("fetch", time.monotonic() - t0)
        out.write(f"fetched {len(report.copied)} files to {opts.fetch_to}; the cost guard terminates the instance now\n")
    return code


def runs_later(opts: LaunchOptions, box: Box, target: str) -> str:
    """--runs --detach: how to get the runs' statistics once they are done."""
    seeds = " ".join(str(seed) for seed, _ in opts.job.run_dirs())
    name = contract.RUN_DIR_FORMAT.format(seed="$s")
    return (f"the {opts.job.runs} runs train one after another on the box, seeds {seeds.replace(' ', ', ')}, each in "
            f"{box.weights_dir}/{contract.RUN_DIR_FORMAT.format(seed='S')}. Once they are done: `for s in {seeds}; do fab "
            f"fetch-weights --host {target} --weights-dir {box.weights_dir}/{name} --to {opts.fetch_to}/{name} --latest-only; done`, "
            f"then `python -m job.stats {opts.fetch_to}` prints their statistics (or launch the same command again without "
            "--detach: finished runs are not trained again, and it prints them)")


def report_runs(conn, box: Box, opts: LaunchOptions, out=sys.stdout) -> None:
    """--runs: each run's metrics.jsonl to --fetch-to here, then the record board's statistics over them (job.stats)."""
    from infra.fetch import fetch_metrics
    from job import stats

    names = [name for _, name in opts.job.run_dirs()]
    dirs = fetch_metrics(conn, box.weights_dir, names, opts.fetch_to)
    out.write(f"fetched the metrics of {len(dirs)} of {len(names)} runs to {opts.fetch_to}: "
              f"`python -m job.stats {opts.fetch_to}` prints this again\n")
    try:
        out.write(stats.format_stats(stats.compute([str(d) for d in dirs])) + "\n")
    except UserError as e:  # stopped before any run finished
        out.write(f"no run finished, so no statistics yet: the same launch resumes them ({e})\n")


def follow(conn, docker: str, name: str, target: str, tail: int | str = "all", out=sys.stdout, done: str | None = None) -> int:
    """Stream until the container exits; Ctrl-C or a dropped connection only stop the streaming. `done`: what to do
    once training finished, where it is not to fetch the weights dir."""
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
        raise UserError(failure_advice(conn.host, code))
    out.write(f"training finished on {conn.host}: " + (done or f"fetch the weights with `fab fetch-weights --host {target}`") + "\n")
    return 0
