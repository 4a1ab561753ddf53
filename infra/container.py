"""The training container on the box: prepare data, start, stream logs, report status, stop.

Plain functions over a Connection and the Box that preflight found; the fab tasks are thin wrappers. Containers
carry labels (nanogpt.role=train|sync, nanogpt.node-rank) so logs/status/stop find them whatever their name.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shlex
import sys
import time
from dataclasses import dataclass, field

from infra.box import Box
from infra.flags import integer, option, optional, pairs, words
from infra.image import image_id as find_image_id
from infra.ssh import run, stream
from job import config, contract, recipes
from job.errors import UserError
from job.identity import IMAGE_ENV, IMAGE_ID_ENV

ROLE = "nanogpt.role"
RANK = "nanogpt.node-rank"
# GPU runs: unlimited locked memory (pinned buffers, NCCL) and a 64 MiB stack, as NVIDIA recommends for PyTorch.
GPU_FLAGS = "--gpus all --ulimit memlock=-1 --ulimit stack=67108864"
SUPERVISOR = "job.supervisor"  # the image's default command: one trainer process per GPU under torchrun
HF_TOKEN_MOUNT = "/run/nanogpt/hf-token"  # the Hugging Face token in the download container, read-only, 0600 on the box
STOP_TIMEOUT = 300  # seconds `docker stop` waits for the final checkpoint (1.5 GB to network storage) before SIGKILL


# Where a run's data comes from when its shards are missing (`fab launch --data`): downloaded already tokenized from
# the Hugging Face hub (job/prepare/hub.py; minutes), tokenized on the box from text (an hour of a big box's CPUs), or,
# for the presets sized to it, the bundled corpus.
DATA_MODES = ("hub", "tokenize", "bundled")
BUNDLED_SHARD_TOKENS = 50_000  # the bundled corpus's shards, as --data bundled prepares them (its val shard too)


@dataclass
class Job:
    """What to run; the same on every node of a multi-node run. Built from the recipe's card (job/recipes/) and checked
    with the trainer's own parser, so that the laptop refuses what the box would, before anything is billed."""

    recipe: str = option(recipes.DEFAULT, "training recipe: " + ", ".join(f"{n} ({recipes.get(n).summary})" for n in recipes.names()))
    preset: str | None = option(None, "the recipe's preset: its model size and training defaults (default: the recipe's first, "
                                      "its full run; `python -m job.train --recipe NAME --help` lists them)")
    data: str | None = option(None, "where missing shards come from: hub (default: the recipe's corpus, already tokenized, in minutes), "
                                    "tokenize (made from text on the box, an hour), bundled (the small presets' default: the bundled "
                                    "corpus)")
    steps: int | None = option(None, "number of optimizer steps (default: the preset's)", parse=optional(integer()))
    nproc: int | None = option(None, "trainer processes per box (default: one per GPU)", parse=optional(integer()))
    trainer_args: list[str] = option(None, "more trainer flags, quoted: '--eval-every 100 --checkpoint-every 500' (checked here "
                                           "with the trainer's own parser)", parse=words, factory=list, flag="train_args")
    env: dict[str, str] = option(None, "environment for the trainer, quoted: 'NCCL_DEBUG=INFO'", parse=pairs, factory=dict)
    runs: int | None = option(None, "train the run N times, one after another, with the seeds --seed, --seed + 1, ... (each in "
                                    "seed-S under the weights dir, all with one compile cache), then bring their metrics.jsonl "
                                    "to --fetch-to and print the record board's statistics (python -m job.stats)",
                              parse=optional(integer()))
    name: str = contract.CONTAINER_NAME
    mounts: dict[str, str] = field(default_factory=dict)  # a file on the box -> its read-only path in the container (secrets)

    def __post_init__(self):
        self.card = config.card(self.recipe)  # an unknown recipe is one line, before anything happens on the box
        if self.preset is None:
            self.preset = self.card.default_preset
        if self.preset not in self.card.presets:
            raise UserError(f"--preset {self.preset}: the {self.recipe} recipe's presets are {', '.join(self.card.presets)}")
        if self.data is None:
            self.data = "bundled" if self.preset in self.card.bundled_presets else "hub"
        if self.data not in DATA_MODES:
            raise UserError(f"--data {self.data!r}: choose one of {', '.join(DATA_MODES)}")
        self.cfg = self.config(world_size=1)

    def config(self, world_size: int = 1) -> config.TrainConfig:
        """The run's settings as the trainer will take them, for `world_size` ranks in all: every --train-args flag goes
        through the trainer's own parser here (files=False: the paths named are the box's)."""
        try:
            cfg = config.parse_args(self.trainer_flags(), world_size=world_size, files=False)
        except UserError as e:
            raise UserError(f"the trainer would refuse this run{f' on {world_size} ranks' if world_size > 1 else ''}: {e}") from None
        if self.data == "bundled":
            for lay in config.layouts(cfg):
                for what, B, T in (("a training", lay.micro_batch, lay.seq_len), ("a validation", cfg.micro_batch, cfg.val_seq_len or cfg.seq_len)):
                    if B * T * world_size + 1 > BUNDLED_SHARD_TOKENS:
                        raise UserError(f"--data bundled makes shards of {BUNDLED_SHARD_TOKENS:,} tokens, fewer than {what} micro-step "
                                        f"of preset {self.preset} needs ({B} x {T} x {world_size} ranks + 1): use --data hub, "
                                        f"or a preset sized to the bundled corpus ({', '.join(self.card.bundled_presets) or 'none'})")
        return cfg

    def world_size(self, gpus_per_node: list[int]) -> int:
        """Ranks in all: --nproc per node, else one per GPU (one on a box without any), as job.supervisor starts them."""
        return sum(self.nproc or max(g, 1) for g in gpus_per_node)

    def check_world(self, gpus_per_node: list[int]) -> None:
        """The settings for the run's real world size (known once the boxes' GPUs are): a batch that does not divide
        among the ranks is refused before any image is built or data downloaded."""
        self.config(self.world_size(gpus_per_node))

    @property
    def hub(self) -> contract.HubShards:
        return contract.HUB_SHARDS[self.card.data]

    @property
    def data_subdir(self) -> str:
        """The shards' directory under the persistent mount: one per corpus and format, so the paths never mix."""
        if self.data == "bundled":
            return "tinyshakespeare"
        return self.hub.subdir if self.data == "hub" else contract.TOKENIZED_SUBDIR[self.hub.tokenize]

    def run_steps(self) -> int:
        """Optimizer steps of the launch, what its price rests on: --steps (else the preset's), times --runs."""
        return self.cfg.max_steps * (self.runs or 1)

    def run_dirs(self) -> list[tuple[int, str]]:
        """--runs: each run's seed and its log dir under the weights dir, as the supervisor names them."""
        return contract.run_dirs(self.cfg.seed, self.runs or 0)

    def tokens_per_step(self) -> int:
        """Tokens per step, on average over the run (a recipe may stage its batch)."""
        return self.train_tokens() // self.cfg.max_steps

    def train_tokens(self) -> int:
        """The tokens the run trains on, which is what a download is sized to."""
        return self.card.train_tokens(self.cfg)

    def prepare_command(self) -> str:
        out = f"{contract.PERSISTENT}/{self.data_subdir}"
        if self.data == "bundled":
            return f"python -m job.prepare text job/assets/tinyshakespeare.txt --paragraphs --out {out} --shard-size {BUNDLED_SHARD_TOKENS}"
        if self.data == "hub":
            return f"python -m job.prepare {self.card.data} --out {out} --train-tokens {self.train_tokens()}"
        return f"python -m job.prepare {self.hub.tokenize} --out {out}"

    def trainer_flags(self) -> list[str]:
        """The trainer's flags (job.train's), as the supervisor passes them on."""
        args = ["--preset", self.preset, "--recipe", self.recipe, "--data-dir", f"{contract.PERSISTENT}/{self.data_subdir}",
                "--log-dir", contract.LOG_DIR, "--resume", "auto"]
        if self.steps:
            args += ["--max-steps", str(self.steps)]
        return args + self.trainer_args

    def trainer_command(self) -> list[str]:
        runs = ["--runs", str(self.runs)] if self.runs else []  # the supervisor's own flag: it runs the seeds in turn
        return ["python", "-m", SUPERVISOR, *runs, *self.trainer_flags()]


def docker_base(box: Box, *, detach: bool, name: str | None, labels: dict[str, str], network_host: bool = False,
                gpus: bool = True) -> str:
    """`docker run` with what every container of ours shares; gpus=False for those that never touch a GPU."""
    # --init: a tiny init as PID 1 forwards `docker stop`'s SIGTERM. Without it torchrun is PID 1, and the kernel drops
    # signals to a PID 1 that has no handler yet, so a stop in the first seconds would wait for the SIGKILL.
    parts = [box.docker, "run", "-d" if detach else "--rm", "--init", "--user", f"{box.uid}:{box.gid}", "--ipc=host",
             "-v", shlex.quote(f"{box.data_dir}:{contract.PERSISTENT}"), "-v", shlex.quote(f"{box.weights_dir}:{contract.LOG_DIR}")]
    if name:
        parts += ["--name", shlex.quote(name)]
    parts += [f"--label {shlex.quote(f'{k}={v}')}" for k, v in labels.items()]
    if network_host:
        parts.append("--network host")  # multi-node rendezvous and NCCL/Gloo; sidecars reach S3 and the API as the host does
    if gpus and box.use_gpus:
        parts.append(GPU_FLAGS)
    return " ".join(parts)


def has_shards(conn, box: Box, job: Job) -> bool:
    """Ready to train: train and val shards (.npy or .bin), and, where job.prepare wrote them, its manifest says it
    finished (an interrupted prepare leaves complete shards but not all of them; running prepare again resumes it)
    with train tokens enough for this run (a download is sized to the run). Shards made elsewhere (build-nanogpt's
    fineweb.py) have no manifest and count as they are."""
    d = shlex.quote(posixpath.join(box.data_dir, job.data_subdir))
    found = " && ".join(f"find {d} -maxdepth 1 \\( -name '*{s}*.npy' -o -name '*{s}*.bin' \\) 2>/dev/null | grep -q ." for s in ("train", "val"))
    if run(conn, found, warn=True).failed:
        return False
    manifest = run(conn, f"cat {d}/{contract.PREPARE_MANIFEST} 2>/dev/null", warn=True)
    if not manifest.ok:
        return True
    try:
        m = json.loads(manifest.stdout)
    except ValueError:
        return False
    enough = m.get("train_tokens") is None or (job.data == "hub" and m["train_tokens"] >= job.train_tokens())
    return m.get("complete") is True and enough


PREPARE_CONTAINER = f"{contract.CONTAINER_NAME}-prepare"  # the data preparation, detached, while the image is made


def shards_ready(conn, box: Box, job: Job, out=sys.stdout) -> bool:
    if has_shards(conn, box, job):
        out.write(f"data: shards found in {box.data_dir}/{job.data_subdir} on {conn.host}\n")
        return True
    return False


def start_data(conn, box: Box, image: str, job: Job, token_file=None, out=sys.stdout) -> None:
    """Start making the shards the run needs in the background, in a detached container of `image` (the data image,
    or the trainer image); wait_data follows it to its end. A container left by an earlier launch is replaced:
    job.prepare resumes where that one stopped. token_file() puts the laptop's Hugging Face token on the box and
    returns its path there, or returns None (anonymous downloads)."""
    where = f"{box.data_dir}/{job.data_subdir}"
    run(conn, f"{box.docker} rm -f {PREPARE_CONTAINER} >/dev/null 2>&1", warn=True)
    flags = docker_base(box, detach=True, name=PREPARE_CONTAINER, labels={ROLE: "prepare"}, network_host=job.data == "hub", gpus=False)
    if job.data == "hub":
        out.write(f"data: downloading {job.hub.repo} to {where} on {conn.host} (the val shard and train shards for "
                  f"{job.train_tokens():,} tokens, already tokenized; --data tokenize makes them from text on the box instead)\n")
        flags += hub_flags(token_file() if token_file else None)
    else:
        out.write(f"data: no complete set of shards in {where} on {conn.host}: tokenizing them there "
                  f"({box.cpus} cores; an interrupted preparation resumes)\n")
    res = run(conn, f"{flags} {shlex.quote(image)} {job.prepare_command()}", warn=True)
    if res.failed:
        raise UserError(f"could not start the data preparation on {conn.host}: {' '.join(res.stderr.split())[:300]}")


def wait_data(conn, box: Box, job: Job, t0: float, out=sys.stdout) -> None:
    """The started preparation's output (said once it is done, after the image's), to its end, saying how it went."""
    where = f"{box.data_dir}/{job.data_subdir}"
    tail = _Tail(out)
    stream(conn, f"{box.docker} logs -f {PREPARE_CONTAINER} 2>&1", out=tail)
    res = run(conn, f"{box.docker} wait {PREPARE_CONTAINER}", warn=True)
    run(conn, f"{box.docker} rm -f {PREPARE_CONTAINER} >/dev/null 2>&1", warn=True)
    status = int(res.stdout.strip()) if res.ok and res.stdout.strip().isdigit() else -1
    if status == contract.EXIT_USER_ERROR and tail.last_error():
        raise UserError(f"data on {conn.host}: {tail.last_error()}")  # the box's own one line, said once
    if tail.held:
        out.write(tail.held)
    if status != 0:
        raise UserError(f"data preparation failed on {conn.host} (exit {status}): its output is above; fix it and launch again")
    out.write(f"data: ready in {time.monotonic() - t0:.1f} s ({'downloaded' if job.data == 'hub' else 'tokenized'} into {where})\n")


def hub_flags(token_path: str | None) -> str:
    """What the download container needs of the hub: the token as a read-only file (never its value in a command line,
    the environment or `docker inspect`), and HF_ENDPOINT when the laptop names another endpoint (a mirror)."""
    flags = ""
    if token_path:
        flags += f" -v {shlex.quote(f'{token_path}:{HF_TOKEN_MOUNT}:ro')} -e HF_TOKEN_PATH={HF_TOKEN_MOUNT}"
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint:
        flags += f" -e {shlex.quote(f'HF_ENDPOINT={endpoint}')}"
    return flags


class _Tail(io.TextIOBase):
    """Passes the streamed lines on, except an `error:` line: that one is held back, so that the launcher says it once,
    as its own error line, when the command ends on it."""

    def __init__(self, out):
        self.out, self.held = out, ""

    def write(self, s: str) -> int:
        for line in s.splitlines(keepends=True):
            if self.held and line.strip():
                self.out.write(self.held)  # more came after it: not the last word, pass it on
                self.held = ""
            if line.startswith("error: "):
                self.held = line
            else:
                self.out.write(line)
        return len(s)

    def last_error(self) -> str:
        return self.held.strip()[len("error: "):]


def containers(conn, docker: str, role: str = "train", all_states: bool = False) -> list[dict]:
    """Our containers on the box, node rank 0 first: [{name, state, status, rank}]."""
    fmt = '{{.Names}}\t{{.State}}\t{{.Status}}\t{{.Label "' + RANK + '"}}'
    res = run(conn, f"{docker} ps {'-a ' if all_states else ''}--filter label={ROLE}={role} --format {shlex.quote(fmt)}", warn=True)
    rows = [dict(zip(("name", "state", "status", "rank"), line.split("\t"), strict=False)) for line in res.stdout.splitlines() if line.strip()]
    return sorted(rows, key=lambda r: (r.get("rank") or "0", r["name"]))


def running(conn, docker: str, role: str = "train") -> list[dict]:
    return [c for c in containers(conn, docker, role) if c["state"] == "running"]


def refuse_if_active(conn, docker: str) -> None:
    active = running(conn, docker)
    if active:
        raise UserError(f"a training run is already active on {conn.host} ({active[0]['name']}, {active[0]['status']}): "
                        f"watch it with `fab logs --host {conn.user}@{conn.host}`, or pass --restart to stop it and start again")


def start(conn, box: Box, image: str, job: Job, *, nnodes: int = 1, node_rank: int = 0, master: tuple[str, int] | None = None,
          out=sys.stdout) -> str:
    """Start the trainer detached (the caller has checked that none runs, or stopped it). Returns the container name."""
    name, cmd = run_command(box, image, job, nnodes=nnodes, node_rank=node_rank, master=master,
                            image_id=find_image_id(conn, box.docker, image))
    run(conn, f"{box.docker} rm -f {shlex.quote(name)} >/dev/null 2>&1", warn=True)  # a finished run's container holds the name
    res = run(conn, cmd, warn=True)
    if res.failed:
        raise UserError(f"docker run failed on {conn.host}: {' '.join((res.stderr or res.stdout).split())[:300]}")
    out.write(f"started {name} on {conn.host}" + (f" (node {node_rank} of {nnodes})" if nnodes > 1 else "") + "\n")
    return name


def run_command(box: Box, image: str, job: Job, *, nnodes: int = 1, node_rank: int = 0,
                master: tuple[str, int] | None = None, image_id: str | None = None) -> tuple[str, str]:
    """(container name, the `docker run` command line) of the trainer: what start runs and a dry run prints. The
    image's reference and id go in as NANOGPT_IMAGE and NANOGPT_IMAGE_ID: the run records them (job/identity.py)."""
    name = job.name if nnodes == 1 else f"{job.name}-node{node_rank}"
    env = {**job.env, IMAGE_ENV: image, **({IMAGE_ID_ENV: image_id} if image_id else {})}
    if job.nproc:
        env["NPROC"] = str(job.nproc)
    if nnodes > 1:
        env.update(NNODES=str(nnodes), NODE_RANK=str(node_rank), MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
    flags = docker_base(box, detach=True, name=name, labels={ROLE: "train", RANK: str(node_rank)}, network_host=nnodes > 1)
    flags += "".join(f" -e {shlex.quote(f'{k}={v}')}" for k, v in env.items())
    flags += "".join(f" -v {shlex.quote(f'{src}:{dst}:ro')}" for src, dst in job.mounts.items())
    return name, f"{flags} {shlex.quote(image)} {' '.join(shlex.quote(a) for a in job.trainer_command())}"


def find_train_container(conn, docker: str) -> dict:
    found = containers(conn, docker, all_states=True)
    if not found:
        raise UserError(f"no training container on {conn.host}: start one with `fab launch --host {conn.user}@{conn.host}`")
    live = [c for c in found if c["state"] == "running"]
    return (live or found)[0]


def stream_logs(conn, docker: str, name: str, tail: int | str = "all", follow: bool = True, out=sys.stdout) -> int:
    """Copy the container's output here until it exits (or Ctrl-C, which the caller turns into a hint)."""
    return stream(conn, f"{docker} logs {'-f ' if follow else ''}--tail {shlex.quote(str(tail))} {shlex.quote(name)} 2>&1", out=out)


def exit_code(conn, docker: str, name: str) -> int | None:
    res = run(conn, f"{docker} inspect --format '{{{{.State.Status}}}} {{{{.State.ExitCode}}}}' {shlex.quote(name)}", warn=True)
    parts = res.stdout.split()
    return int(parts[1]) if res.ok and parts and parts[0] == "exited" else None


def weights_mount(conn, docker: str, name: str) -> str | None:
    fmt = '{{range .Mounts}}{{if eq .Destination "' + contract.LOG_DIR + '"}}{{.Source}}{{end}}{{end}}'
    res = run(conn, f"{docker} inspect --format {shlex.quote(fmt)} {shlex.quote(name)}", warn=True)
    return res.stdout.strip() or None


def newest_checkpoint(conn, docker: str, name: str, weights: str | None = None) -> str | None:
    """`model_00100.pt (1,455 MiB, 2026-11-26T03:10)` for the newest checkpoint in the container's weights dir."""
    weights = weights or weights_mount(conn, docker, name)
    if not weights:
        return None
    cmd = f"cd {shlex.quote(weights)} && ls -l --time-style=+%Y-%m-%dT%H:%M {contract.CHECKPOINT_GLOB} 2>/dev/null | tail -1"
    parts = run(conn, cmd, warn=True).stdout.split()
    return f"{parts[-1]} ({int(parts[4]) / 2**20:,.0f} MiB, {parts[5]})" if len(parts) >= 7 else None


def status(conn, docker: str) -> dict:
    """Running?, step, loss, tok/s, ETA, newest checkpoint, GPU use: read from docker, metrics.jsonl and nvidia-smi."""
    c = find_train_container(conn, docker)
    info = {"host": conn.host, "container": c["name"], "state": c["state"], "since": c["status"]}
    weights = weights_mount(conn, docker, c["name"])
    if weights:
        info["weights_dir"] = weights
        tail = run(conn, f"tail -n 400 {shlex.quote(weights + '/' + contract.METRICS_FILE)}", warn=True).stdout
        info.update(summarize_metrics(tail.splitlines()))
        info["checkpoint"] = newest_checkpoint(conn, docker, c["name"], weights)
        from infra.timeline import Timeline, path_on_box

        kept = run(conn, f"cat {shlex.quote(path_on_box(weights))}", warn=True)
        timeline = Timeline.from_json(kept.stdout) if kept.ok else None
        if timeline and timeline.stages:
            info["timeline"] = timeline.lines()
    gpu = run(conn, "nvidia-smi --query-gpu=utilization.gpu,memory.used,memory.total --format=csv,noheader,nounits", warn=True)
    if gpu.ok and gpu.stdout.strip():
        rows = [[int(float(v)) for v in line.split(",")] for line in gpu.stdout.splitlines() if line.strip()]
        info["gpus"] = f"{len(rows)} GPUs, {sum(r[0] for r in rows) / len(rows):.0f}% busy, " \
                       f"{sum(r[1] for r in rows) / 1024:.0f}/{sum(r[2] for r in rows) / 1024:.0f} GiB"
    return info


def summarize_metrics(lines: list[str]) -> dict:
    last: dict[str, dict] = {}
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if isinstance(ev, dict) and "event" in ev:
            last[ev["event"]] = ev
    out: dict = {}
    train = last.get("train")
    if train:
        out.update(step=train["step"], loss=round(train["loss"], 4), tok_s=train.get("tok_s"))
        cfg = last.get("start", {}).get("config", {})
        max_steps = cfg.get("max_steps")
        if max_steps and train.get("ms"):
            from job.metrics import format_eta

            out["max_steps"] = max_steps
            out["eta"] = format_eta(train["ms"] / 1000 * (max_steps - train["step"] - 1))
    if "val" in last:
        out["val_loss"] = round(last["val"]["loss"], 4)
    if "hellaswag" in last:
        out["hellaswag"] = last["hellaswag"].get("acc_norm")
    if "end" in last:
        out["ended"] = last["end"].get("reason")
    ident = last.get("start", {}).get("identity") or {}
    if ident.get("commit") or ident.get("code_sha256"):  # the code the run runs (job/identity.py)
        out["code"] = ident["commit"][:12] if ident.get("commit") else f"sha256 {ident['code_sha256'][:12]}"
    return out


def format_status(info: dict) -> str:
    keys = ("container", "state", "since", "code", "step", "max_steps", "loss", "val_loss", "hellaswag", "tok_s", "eta", "checkpoint",
            "gpus", "ended")
    width = max(len(k) for k in keys)
    lines = [f"{info['host']}:"]
    for k in keys:
        if info.get(k) is not None:
            v = f"{info[k]:,.0f}" if k == "tok_s" else info[k]
            lines.append(f"  {k.ljust(width)}  {v}")
    if info.get("timeline"):  # the launch's stages, as `fab launch` printed them at its end
        lines += [f"  {'timeline'.ljust(width)}"] + [f"    {line}" for line in info["timeline"]]
    return "\n".join(lines)


def stop_container(conn, docker: str, name: str, timeout: int = STOP_TIMEOUT, out=sys.stdout) -> None:
    """SIGTERM, so the trainer saves a checkpoint at the end of the current step, then wait for it to exit."""
    out.write(f"stopping {name} on {conn.host} (SIGTERM; the trainer saves a checkpoint, up to {timeout} s)\n")
    res = run(conn, f"{docker} stop -t {int(timeout)} {shlex.quote(name)}", warn=True, timeout=timeout + 60)
    if res.failed:
        raise UserError(f"could not stop {name} on {conn.host}: {' '.join(res.stderr.split())[:200]}")
