"""What each launch step would do, found by looking only (`docker image inspect`, `docker ps`, `ls` of the data dir):
the plans that `fab launch --dry-run` prints. Each takes the launch's shared state (infra.launch.LaunchRun) and a
node's rank and returns that node's lines; infra.launch.STEPS pairs each with the step that does it, so the dry run and
the launch are one list of steps run in two modes.
"""

from __future__ import annotations

import posixpath
import shlex

from infra.box import Box
from infra.container import has_shards, run_command, running
from infra.credentials import wants_wandb
from infra.image import built_tags, data_pull_ref, image_id, plan_image, plan_pull
from infra.ssh import run
from job import contract
from job.errors import UserError

# What job.prepare writes, for the plan's size line (docs/data.md): a 10B-token corpus as uint16 shards, the bundled one.
PREPARED_SIZE = {"bundled": "about 1 MB", "tokenize": "about 20 GB (10B tokens of {corpus}, downloaded as text and tokenized on the box)"}


def nothing(r, rank: int) -> list[str]:
    """The plan of a step that only changes what the others' lines already say (or nothing worth a line)."""
    return []


def plan_active(r, rank: int) -> list[str]:
    active = running(r.conns[rank], r.boxes[rank].docker)
    if not active:
        return ["training: none active on the box"]
    what = "stopped with a checkpoint once the image and data are ready (--restart)" if r.opts.restart else \
        "launch stops here with an error (pass --restart to replace it)"
    return [f"training: {active[0]['name']} is active ({active[0]['status']}): {what}"]


def plan_pull_step(r, rank: int) -> list[str]:
    o = r.opts
    if not o.image or o.ship:
        return []
    image, lines = plan_pull(r.conns[rank], r.boxes[rank].docker, flavour=r.flavour, image=o.image, rank=rank)
    r.images.append(image)  # the reference the later steps' lines name
    return lines


def plan_image_step(r, rank: int) -> list[str]:
    o = r.opts
    pulling = bool(o.image) and not o.ship
    image, lines = plan_image(r.conns[rank], r.boxes[rank].docker, flavour=r.flavour, image=o.image if o.ship else None, ship=o.ship,
                              build_args=o.build_args, wheels=o.wheels, fallback=pulling)
    if not pulling:
        r.images.append(image)  # the reference the later steps' lines name
    return lines


def plan_data(r, rank: int) -> list[str]:
    job, box, conn = r.opts.job, r.boxes[rank], r.conns[rank]
    where = posixpath.join(box.data_dir, job.data_subdir)
    if has_shards(conn, box, job):
        size = run(conn, f"du -sh {shlex.quote(where)} | cut -f1", warn=True).stdout.strip() or "?"
        return [f"data: shards present in {where} ({size}): nothing to prepare"]
    if job.data == "hub":
        hub = job.hub
        shards = -(-job.train_tokens() // hub.shard_tokens)
        gb = (shards * hub.shard_tokens + hub.shard_tokens) * 2 / 1e9  # uint16 tokens; the val shard is at most one more
        head = (f"data: no complete set of shards in {where}: downloaded from the Hugging Face hub ({hub.repo}: the val shard "
                f"and {shards} train shard(s) for {job.train_tokens():,} tokens, at most {gb:.1f} GB)")
    else:
        size = PREPARED_SIZE[job.data].format(corpus=job.hub.tokenize)
        head = f"data: no complete set of shards in {where}: prepared on the box ({box.cpus} cores), {size}"
    return [f"{head} in a container running `{job.prepare_command()}`; {box.free_gb:.0f} GB free there", "  " + data_when(r, rank)]


def data_when(r, rank: int) -> str:
    """Which image the data is prepared in, and so when: beside the trainer image's build, or after it comes."""
    o, conn, box = r.opts, r.conns[rank], r.boxes[rank]
    if rank:
        return "once node 0's data is ready (a shared file system may have it then), in the trainer image"
    if o.ship:
        return "after the trainer image is shipped, in it"
    if o.image:
        ref = data_pull_ref(o.image, r.flavour)
        if ref is None:
            return "after the trainer image is pulled, in it (a digest names no data image; --image by tag pulls its data image first)"
        return (f"in the background while the trainer image is pulled: in the data image {ref}, pulled first (push-image pushes it; "
                "without it, after the trainer image is pulled, in it)")
    trainer, data = built_tags(r.flavour, o.build_args, o.wheels)
    if image_id(conn, box.docker, trainer):
        return f"now, in the trainer image {trainer} (on the box already)"
    there = "on the box already" if image_id(conn, box.docker, data) else "built first, in a fraction of the trainer image's time"
    return f"in the background while the trainer image is built: in the data image {data} ({there}; job.prepare without torch)"


def plan_wandb(r, rank: int) -> list[str]:
    if rank or not wants_wandb(r.opts.job.trainer_args):
        return []
    return ["dashboards: this machine's W&B key goes to a 0600 file on the box, mounted read-only for rank 0"]


def plan_sidecar(r, rank: int) -> list[str]:
    if rank or not r.opts.sync_s3:
        return []
    return [f"sidecar: uploads each checkpoint to {r.opts.sync_s3} (this machine's AWS credentials go to a 0600 file on the box)"]


def plan_guard(r, rank: int) -> list[str]:
    cloud = r.opts.cloud
    if rank or not cloud.guarded:
        return []
    return ["cost guard: terminates the instance once training is over and the final checkpoint is safe"
            if cloud.terminate_when_done else f"cost guard: stops training after {cloud.max_hours:g} h"]


def plan_container(r, rank: int) -> list[str]:
    job, box = r.opts.job, r.boxes[rank]
    _, cmd = run_command(box, r.images[rank], job, nnodes=len(r.conns), node_rank=rank, master=r.master)
    if not job.runs:
        return ["container: " + cmd]
    seeds = [seed for seed, _ in job.run_dirs()]
    return ["container: " + cmd,
            f"runs: {job.runs}, one after another, seeds {', '.join(map(str, seeds))}, each in {box.weights_dir}/"
            f"{contract.RUN_DIR_FORMAT.format(seed='S')} with one compile cache; "
            + ("with --detach, `python -m job.stats` gives their statistics once they are fetched" if r.opts.detach else
               f"then their metrics.jsonl come to {r.opts.fetch_to} and their statistics are printed (python -m job.stats)")]


def cost_lines(opts, boxes: list[Box], timeline=None) -> list[str]:
    """The estimate where the box is a known Lambda instance type (found by its address with the API key), else why not:
    the whole run, then setup (the last launch's measured stages, from its timeline on the box) and training apart."""
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
    if timeline is not None and not timeline.matches(opts.job.recipe, opts.job.preset, plan.type_name):
        timeline = None
    return ["cost: " + cost_line(plan, opts.job.run_steps(), step_seconds, nodes=len(boxes), basis=basis,
                                 tokens_per_step=opts.job.tokens_per_step(), setup=timeline),
            *("  " + line for line in cost_split(plan, opts.job, step_seconds, basis, timeline, nodes=len(boxes)))]


def cost_split(plan, job, step_seconds: float | None, basis: str | None, timeline, nodes: int = 1) -> list[str]:
    """Setup and training priced apart: setup from a measured timeline's stages (each one never measured says so),
    training from the step time price_basis gave (or the GPU's assumed throughput)."""
    from infra.cloud import assumed_step_seconds, training_line
    from infra.timeline import setup_estimate

    if step_seconds is None:
        step_seconds, basis = assumed_step_seconds(plan.type_name, plan.gpus, job.tokens_per_step(), nodes=nodes), "assumed"
    return [*setup_estimate(timeline, plan.price_cents, nodes), training_line(plan.price_cents, job.run_steps(), step_seconds, nodes, basis)]
