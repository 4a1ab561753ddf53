"""`fab launch --dry-run`: connect, preflight, and print what a launch would do, changing nothing on the box.

The plan is the lines each launch step contributes (PLAN_STEPS, in launch order), each found by looking only:
`docker image inspect`, `docker ps`, `ls` of the data dir. A step added to the launch adds its plan function here.
Preflight runs with create=False, so not even the data and weights dirs are made.
"""

from __future__ import annotations

import posixpath
import shlex
import sys
from dataclasses import dataclass

from infra.box import Box, preflight, table
from infra.container import has_shards, run_command, running
from infra.flavour import Flavour, choose_flavour
from infra.image import plan_image
from infra.ssh import run
from job.errors import UserError

# What job.prepare writes, for the plan's size line (docs/data.md): FineWeb-edu 10B as uint16 shards, the tiny corpus.
PREPARED_SIZE = {"tiny": "about 1 MB", "default": "about 20 GB (FineWeb-edu 10B tokens, downloaded and tokenized on the box)"}


@dataclass
class PlanContext:
    conn: object
    box: Box
    opts: object  # infra.launch.LaunchOptions
    flavour: Flavour
    rank: int
    nnodes: int
    master: tuple[str, int]  # node 0's address and rendezvous port, as the launch passes them
    image: str = ""  # set by the image step: the reference the later steps run


def plan_active(ctx: PlanContext) -> list[str]:
    active = running(ctx.conn, ctx.box.docker)
    if not active:
        return ["training: none active on the box"]
    what = "stopped with a checkpoint once the image and data are ready (--restart)" if ctx.opts.restart else \
        "launch stops here with an error (pass --restart to replace it)"
    return [f"training: {active[0]['name']} is active ({active[0]['status']}): {what}"]


def plan_image_step(ctx: PlanContext) -> list[str]:
    o = ctx.opts
    ctx.image, lines = plan_image(ctx.conn, ctx.box.docker, flavour=ctx.flavour, image=o.image, ship=o.ship, build_args=o.build_args,
                                  wheels=o.wheels)
    return lines


def plan_data(ctx: PlanContext) -> list[str]:
    job, box = ctx.opts.job, ctx.box
    where = posixpath.join(box.data_dir, job.data_subdir)
    if has_shards(ctx.conn, box, job):
        size = run(ctx.conn, f"du -sh {shlex.quote(where)} | cut -f1", warn=True).stdout.strip() or "?"
        return [f"data: shards present in {where} ({size}): nothing to prepare"]
    if job.data == "hub":
        hub = job.hub
        shards = -(-job.train_tokens() // hub.shard_tokens)
        gb = (shards * hub.shard_tokens + hub.shard_tokens) * 2 / 1e9  # uint16 tokens; the val shard is at most one more
        return [f"data: no complete set of shards in {where}: downloaded from the Hugging Face hub ({hub.repo}: the val shard "
                f"and {shards} train shard(s) for {job.train_tokens():,} tokens, at most {gb:.1f} GB) in a container running "
                f"`{job.prepare_command()}`; {box.free_gb:.0f} GB free there"]
    size = PREPARED_SIZE["tiny" if job.data == "bundled" else "default"]
    return [f"data: no complete set of shards in {where}: prepared on the box ({box.cpus} cores), {size}, in a container running "
            f"`{job.prepare_command()}`; {box.free_gb:.0f} GB free there"]


def plan_sidecars(ctx: PlanContext) -> list[str]:
    o, lines = ctx.opts, []
    if ctx.rank == 0 and o.sync_s3:
        lines.append(f"sidecar: uploads each checkpoint to {o.sync_s3} (this machine's AWS credentials go to a 0600 file on the box)")
    if ctx.rank == 0 and o.cloud.guarded:
        lines.append("cost guard: terminates the instance once training is over and the final checkpoint is safe"
                     if o.cloud.terminate_when_done else f"cost guard: stops training after {o.cloud.max_hours:g} h")
    return lines


def plan_container(ctx: PlanContext) -> list[str]:
    _, cmd = run_command(ctx.box, ctx.image, ctx.opts.job, nnodes=ctx.nnodes, node_rank=ctx.rank, master=ctx.master)
    return ["container: " + cmd]


PLAN_STEPS = [plan_active, plan_image_step, plan_data, plan_sidecars, plan_container]


def cost_lines(opts, boxes: list[Box]) -> list[str]:
    """The estimate where the box is a known Lambda instance type (found by its address with the API key), else why not."""
    from infra.cloud import Plan, cost_line, instance_for, price_basis

    try:
        inst = instance_for(opts.hosts[0], opts.cloud.api_key_file, opts.cloud.api_base)
    except UserError as e:
        return [f"cost: not estimated, the instance type is unknown ({e})"]
    t = inst.get("instance_type") or {}
    specs = t.get("specs") or {}
    plan = Plan(t.get("name", "?"), (inst.get("region") or {}).get("name", "?"), "", None, int(t.get("price_cents_per_hour", 0)),
                int(specs.get("gpus") or len(boxes[0].gpus) or 1))
    step_seconds, basis = price_basis(opts.job, plan.type_name, opts.cloud.step_seconds)
    return ["cost: " + cost_line(plan, opts.job.run_steps(), step_seconds, nodes=len(boxes), basis=basis,
                                 tokens_per_step=opts.job.tokens_per_step())]


def dry_run(opts, conns, out=sys.stdout) -> int:
    boxes = [preflight(c, fs=opts.fs, data_dir=opts.data_dir, weights_dir=opts.weights_dir, allow_cpu=opts.allow_cpu, create=False)
             for c in conns]
    out.write(table(boxes) + "\n")
    opts.job.check_world([len(b.gpus) for b in boxes])
    flavour = choose_flavour(boxes, opts.cuda)
    master = (opts.master_addr or conns[0].host, opts.master_port)
    lines = []
    for rank, (conn, box) in enumerate(zip(conns, boxes, strict=True)):
        ctx = PlanContext(conn, box, opts, flavour, rank, len(conns), master)
        lines.append(f"{conn.user}@{conn.host}" + (f" (node {rank} of {len(conns)})" if len(conns) > 1 else "") + ":")
        lines += ["  " + line for step in PLAN_STEPS for line in step(ctx)]
    lines += cost_lines(opts, boxes)
    out.write("plan (dry run: nothing was changed on the box):\n" + "\n".join(lines) + "\n")
    return 0
