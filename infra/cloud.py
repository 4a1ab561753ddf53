"""Lambda Cloud workflows as plain functions (the fab tasks and `fab launch --provision` call these): instance-type
table, region choice, provision -> active -> SSH answers, find (also by a box's address), terminate with confirmation,
and cost estimates."""

from __future__ import annotations

import json
import math
import re
import secrets
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from job.errors import UserError
from job.sidecar.lambda_cloud import DUPLICATE, LambdaAPIError, LambdaCloud, capacity_summary, load_api_key

if TYPE_CHECKING:
    from infra.container import Job
    from infra.timeline import Timeline

TOKENS_PER_STEP = 2**19  # build-nanogpt's GPT-2 batch
# GPT-2 (124M) training throughput per GPU in tokens/s (bf16 autocast, torch.compile, fused attention, T=1024), for
# the cost estimate when neither --step-seconds nor a previous run's step time is given. docs/BENCHMARKS.md says
# which entries come from measurements (scripts/bench_train.py, scaled for multi-GPU DDP) and which are rough
# guesses; `make bench PRESET=gpt2` on the real card, or a previous run's metrics.jsonl, replaces them.
ASSUMED_TOKENS_PER_GPU_SECOND = [
    ("gh200", 450_000), ("h200", 460_000), ("h100", 450_000), ("b200", 700_000), ("a100", 190_000),
    ("a6000", 60_000), ("a10", 40_000), ("v100", 45_000),
]
# Time billed outside training steps: boot, image pull, compile warm-up (fixed), then evals and checkpoints (fraction).
SETUP_HOURS = 0.25
OVERHEAD = 0.10


class Aborted(UserError):
    exit_code = 1


# --- instance types -------------------------------------------------------------------------------------
def gpus_of(type_name: str, entry: dict | None = None) -> int:
    specs = ((entry or {}).get("instance_type") or {}).get("specs") or {}
    if isinstance(specs.get("gpus"), int):
        return specs["gpus"]
    m = re.match(r"gpu_(\d+)x_", type_name)  # older API versions had no specs.gpus; the name carries it
    return int(m.group(1)) if m else 0


def price_cents(entry: dict) -> int:
    return int(entry["instance_type"]["price_cents_per_hour"])  # an integer in the schema; a string in its own example


def list_types(types: dict) -> list[dict]:
    """Rows for the table, types with capacity first, then by price."""
    rows = []
    for name, entry in types.items():
        regions = [r["name"] for r in entry.get("regions_with_capacity_available") or []]
        rows.append({"type": name, "gpus": gpus_of(name, entry), "price_cents": price_cents(entry), "regions": regions,
                     "description": entry["instance_type"].get("description", "")})
    return sorted(rows, key=lambda r: (not r["regions"], r["price_cents"], r["type"]))


def table(headers: list[str], rows: list[list]) -> str:
    from infra.box import format_table

    return format_table([headers, *rows])


def dollars(cents: float) -> str:
    return f"${cents / 100:,.2f}"


def types_table(types: dict) -> str:
    rows = [[r["type"], r["gpus"], dollars(r["price_cents"]), ", ".join(r["regions"]) or "- (none now)"] for r in list_types(types)]
    return table(["TYPE", "GPUS", "PRICE/HOUR", "REGIONS WITH CAPACITY NOW"], rows)


def pick_region(types: dict, type_name: str, region: str = "auto", required_region: str | None = None) -> str:
    """The region to launch in: `region` if it has capacity, or with 'auto' the first one that has (the file
    system's region when `required_region` is set, since a file system only attaches in its own region)."""
    if type_name not in types:
        known = ", ".join(sorted(types)) or "none"
        raise UserError(f"unknown instance type {type_name!r}: `fab types` lists them ({known})")
    available = [r["name"] for r in types[type_name].get("regions_with_capacity_available") or []]
    if required_region and region not in ("auto", required_region):
        raise UserError(f"--region {region} but the file system lives in {required_region}: use --region {required_region} or auto")
    want = required_region or (None if region == "auto" else region)
    if want:
        if want in available:
            return want
        where = f"capacity now in: {', '.join(available)}" if available else "no region has capacity now"
        why = " (the file system's region)" if required_region else ""
        raise UserError(f"no capacity for {type_name} in {want}{why} right now ({where}): retry in a few minutes"
                        + ("" if required_region else " or pass --region auto"))
    if not available:
        elsewhere = capacity_summary(types)
        if elsewhere == "none":
            raise UserError(f"no capacity for {type_name} in any region right now, nor for any other type: retry in a few minutes")
        raise UserError(f"no capacity for {type_name} in any region right now; capacity now: {elsewhere}: "
                        "pick one of those with --type, or retry in a few minutes")
    return available[0]


# --- provisioning ---------------------------------------------------------------------------------------
@dataclass
class Plan:
    type_name: str
    region: str
    ssh_key: str
    fs: str | None
    price_cents: int
    gpus: int
    create_fs: bool = False  # `fs` does not exist yet: provisioning creates it in `region`

    def fs_line(self, dry: bool = False) -> str:
        """What happens to the file system, or "" when it already exists."""
        if not self.create_fs:
            return ""
        return f"{'would create' if dry else 'creates'} file system {self.fs} in {self.region} (none by that name yet)"


def plan_provision(api: LambdaCloud, type_name: str, region: str = "auto", ssh_key: str = "", fs: str | None = None) -> Plan:
    """Check everything a launch needs (type, capacity, SSH key, file system and its region) without launching or
    creating anything. A file system that does not exist yet is planned for the region the instance launches in."""
    if not type_name:
        raise UserError("no instance type: pass --type (e.g. gpu_8x_h100_sxm5; `fab types` lists them)")
    if not ssh_key:
        raise UserError("no SSH key: pass --ssh-key NAME, the name of a key added at https://cloud.lambdalabs.com/ssh-keys")
    keys = [k["name"] for k in api.ssh_keys()]
    if ssh_key not in keys:
        raise UserError(f"unknown SSH key name {ssh_key!r}: Lambda Cloud has {', '.join(map(repr, keys)) or 'none'}; "
                        "add yours at https://cloud.lambdalabs.com/ssh-keys")
    fs_region = None
    if fs:
        systems = {f["name"]: f for f in api.file_systems()}
        if fs in systems:
            fs_region = systems[fs]["region"]["name"]
    types = api.instance_types()
    chosen = pick_region(types, type_name, region, fs_region)
    return Plan(type_name, chosen, ssh_key, fs, price_cents(types[type_name]), gpus_of(type_name, types[type_name]),
                create_fs=bool(fs) and fs_region is None)


def ensure_file_system(api: LambdaCloud, name: str, region: str, out) -> dict:
    """Create file system `name` in `region`, or take the one that appeared since the plan (a second provision, or a
    retried create whose first reply was lost): Lambda refuses a taken name, and the list says where it lives."""
    try:
        fs = api.create_file_system(name, region)
    except LambdaAPIError as e:
        if e.code != DUPLICATE:
            raise
        fs = next((f for f in api.file_systems() if f["name"] == name), None)
        if fs is None:
            raise
        if fs["region"]["name"] != region:
            raise UserError(f"file system {name} appeared in {fs['region']['name']} meanwhile, not {region}: run again with "
                            f"--region {fs['region']['name']} or auto") from None
        print(f"file system {name} already exists in {region}; using it", file=out)
        return fs
    print(f"created file system {name} in {region}", file=out)
    return fs


def default_name() -> str:
    return f"nanogpt-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class _Progress:
    """One status line: rewritten in place on a terminal, a new line on each change (or each minute) otherwise."""

    def __init__(self, out):
        self.out, self.tty = out, getattr(out, "isatty", lambda: False)()
        self.last, self.last_time = "", 0.0

    def show(self, status: str, line: str) -> None:
        if self.tty:
            self.out.write("\r" + line.ljust(78))
        elif status != self.last or time.monotonic() - self.last_time >= 60:
            self.out.write(line + "\n")
            self.last_time = time.monotonic()
        self.last = status
        self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")


def wait_for_ssh(host: str, port: int = 22, timeout: float = 600.0, interval: float = 2.0) -> None:
    """Until sshd greets us (`SSH-...` banner): an open port alone can still be a booting box's firewall or a proxy."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.settimeout(5)
                if s.recv(256).startswith(b"SSH-"):
                    return
                last = "something answered but not sshd"
        except OSError as e:
            last = e.strerror or type(e).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            raise UserError(f"SSH on {host}:{port} did not answer within {timeout:g} s ({last}): the instance is running and billed; "
                            "check it in the Lambda console, or terminate it")
        time.sleep(min(interval, left))


def provision(api: LambdaCloud, type_name: str = "", region: str = "auto", ssh_key: str = "", fs: str | None = None,
              name: str | None = None, *, plan: Plan | None = None, wait: bool = True, poll_interval: float = 5.0,
              timeout: float = 1800.0, ssh_port: int = 22, ssh_timeout: float = 600.0, ssh_check=None,
              terminate_on_failure: bool = True, out=None) -> dict:
    """Launch one instance and, with `wait`, return it once `active` and answering SSH (its `ip` set).

    `plan` (from plan_provision, e.g. after the user confirmed the price) skips re-checking; `ssh_check(ip)` replaces
    the default banner check on `ssh_port`. An instance that turns unhealthy or never becomes active is terminated
    (with `terminate_on_failure`) so that a failed launch is not billed; Ctrl-C leaves it running and says how to stop it."""
    out = out or sys.stdout
    plan = plan or plan_provision(api, type_name, region, ssh_key, fs)
    name = name or default_name()
    if any(i.get("name") == name and i.get("status") != "terminated" for i in api.instances()):
        raise UserError(f"an instance named {name!r} already exists: pick another --name (names identify boxes for fab terminate)")
    if plan.create_fs:
        ensure_file_system(api, plan.fs, plan.region, out)
    ids = api.launch(plan.region, plan.type_name, plan.ssh_key, name, plan.fs)
    if len(ids) != 1:
        raise LambdaAPIError(f"Lambda launched {len(ids)} instances instead of 1 ({', '.join(ids) or 'none'}): check `fab instances`")
    iid = ids[0]
    print(f"launched {plan.type_name} in {plan.region} as {name} (id {iid}), {dollars(plan.price_cents)}/hour until terminated", file=out)
    if not wait:
        return api.instance(iid)
    try:
        inst = _wait_active(api, iid, plan, poll_interval, timeout, terminate_on_failure, out)
        print(f"{iid} is active at {inst['ip']}; waiting for SSH", file=out, flush=True)
        (ssh_check or (lambda ip: wait_for_ssh(ip, ssh_port, ssh_timeout)))(inst["ip"])
        return inst
    except KeyboardInterrupt:
        print(f"\ninterrupted: instance {iid} keeps running and is billed; stop it with `fab terminate --id {iid}`", file=sys.stderr)
        raise


def _wait_active(api: LambdaCloud, iid: str, plan: Plan, poll_interval: float, timeout: float, terminate_on_failure: bool, out) -> dict:
    progress, t0 = _Progress(out), time.monotonic()
    while True:
        inst = api.instance(iid)
        status, elapsed = inst.get("status", "?"), time.monotonic() - t0
        progress.show(status, f"  {inst.get('name') or iid}: {status} after {elapsed:.0f} s")
        if status == "active" and inst.get("ip"):
            progress.done()
            return inst
        failed = status in ("unhealthy", "terminating", "terminated") and f"became {status}"
        if not failed and elapsed > timeout:
            failed = f"was still {status} after {timeout:.0f} s"
        if failed:
            progress.done()
            what = f"instance {iid} {failed}"
            if terminate_on_failure and status not in ("terminating", "terminated"):
                api.terminate([iid])
                raise UserError(f"{what}; terminated it so it is not billed: try again, or another region (fab types)")
            hint = "" if status == "terminated" else f"; `fab terminate --id {iid}` stops billing"
            raise UserError(f"{what}: check it in the Lambda console{hint}")
        time.sleep(poll_interval)


# --- finding and terminating ----------------------------------------------------------------------------
def find_instance(api: LambdaCloud, instance_id: str | None = None, name: str | None = None) -> dict:
    if bool(instance_id) == bool(name):
        raise UserError("pass exactly one of --id ID or --name NAME (`fab instances` lists them)")
    if instance_id:
        try:
            return api.instance(instance_id)
        except LambdaAPIError as e:
            if e.status == 404:
                raise UserError(f"no instance with id {instance_id}: `fab instances` lists yours") from None
            raise
    found = [i for i in api.instances() if i.get("name") == name and i.get("status") != "terminated"]
    if not found:
        raise UserError(f"no running instance named {name!r}: `fab instances` lists yours")
    if len(found) > 1:
        raise UserError(f"{len(found)} instances are named {name!r} ({', '.join(i['id'] for i in found)}): pass --id")
    return found[0]


def instance_id_for(host: str, api_key: str, api_base: str | None) -> str:
    """The Lambda instance behind an address we were given (for --terminate-when-done on a box we did not provision)."""
    return instance_for(host, api_key=api_key, api_base=api_base, why="the cost guard needs it")["id"]


def instance_for(host: str, api_key_file: str | None = None, api_base: str | None = None, *, api_key: str | None = None,
                 why: str = "") -> dict:
    """The Lambda instance (with its type and price) behind an address: one line of error when there is none."""
    from infra.ssh import parse_host

    ip = parse_host(host)[1]
    found = [i for i in LambdaCloud(api_key or load_api_key(api_key_file), api_base).instances()
             if i.get("ip") == ip and i.get("status") != "terminated"]
    if len(found) != 1:
        raise UserError(f"no Lambda instance of yours has the address {ip} (`fab instances` lists them)" + (f": {why}" if why else ""))
    return found[0]


def instances_table(instances: list[dict]) -> str:
    rows = [[i["id"], i.get("name") or "-", (i.get("instance_type") or {}).get("name", "?"), i.get("status", "?"), i.get("ip") or "-",
             (i.get("region") or {}).get("name", "?"), dollars((i.get("instance_type") or {}).get("price_cents_per_hour", 0) or 0)]
            for i in instances]
    return table(["ID", "NAME", "TYPE", "STATUS", "IP", "REGION", "PRICE/HOUR"], rows)


def confirm(prompt: str, yes: bool = False, input_fn=input) -> None:
    """Proceed only on a typed `yes` (or --yes); anything else, EOF included, aborts."""
    if yes:
        return
    try:
        answer = input_fn(f"{prompt} Type yes to continue: ")
    except EOFError:
        answer = ""
    if answer.strip().lower() != "yes":
        raise Aborted("aborted: nothing was changed")


def terminate(api: LambdaCloud, instances: list[dict], yes: bool = False, input_fn=input, out=None) -> list[dict]:
    """Terminate these instances (dicts from find_instance) after a typed confirmation; returns what the API terminated."""
    out = out or sys.stdout
    if not instances:
        raise UserError("no instance to terminate")
    print(instances_table(instances), file=out, flush=True)
    confirm(f"Terminate {len(instances)} instance(s)? Local disks are erased (attached file systems are kept).", yes, input_fn)
    done = api.terminate([i["id"] for i in instances])
    for i in done:
        print(f"terminated {i['id']} ({i.get('name') or '-'})", file=out)
    missing = {i["id"] for i in instances} - {i["id"] for i in done}
    if missing:
        raise LambdaAPIError(f"Lambda did not confirm terminating {', '.join(sorted(missing))}: check `fab instances`")
    return done


# --- cost -----------------------------------------------------------------------------------------------
def assumed_step_seconds(type_name: str, gpus: int | None = None, tokens_per_step: int = TOKENS_PER_STEP, nodes: int = 1) -> float | None:
    """Seconds per optimizer step from the assumed throughput table, or None for a GPU not in it."""
    gpus = gpus or gpus_of(type_name)
    for model, tok_s in ASSUMED_TOKENS_PER_GPU_SECOND:
        if model in type_name.lower() and gpus:
            return tokens_per_step / (tok_s * gpus * nodes)
    return None


def measured_step_seconds(metrics_path, skip: int = 10) -> float | None:
    """Median step time of a previous run (the trainer's metrics.jsonl `train` events), skipping compile warm-up."""
    path = Path(metrics_path)
    if not path.is_file():
        return None
    ms = []
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "train" and isinstance(e.get("ms"), (int, float)):
            ms.append(e["ms"])
    ms = ms[skip:] if len(ms) > skip else ms
    return statistics.median(ms) / 1000 if ms else None


def estimate_cost(price_cents_per_hour: float, steps: int, step_seconds: float, nodes: int = 1,
                  overhead: float = OVERHEAD, setup_hours: float = SETUP_HOURS) -> tuple[float, float]:
    """(billed hours, dollars) for `steps` steps: step time plus a fraction for evals/checkpoints, plus boot and setup."""
    if step_seconds is None:
        raise UserError("no step time to estimate the cost with: pass --step-seconds (measure it with `make bench PRESET=gpt2`)")
    if not math.isfinite(step_seconds) or step_seconds <= 0:  # a step takes time: 0 would price the run at its setup alone
        raise UserError(f"the step time to estimate the cost with must be positive, got {step_seconds!r} seconds: pass "
                        "--step-seconds with the seconds a step takes (measure it with `make bench PRESET=gpt2`)")
    hours = steps * step_seconds / 3600 * (1 + overhead) + setup_hours
    return hours, hours * price_cents_per_hour * nodes / 100


def cost_line(plan: Plan, steps: int, step_seconds: float | None = None, nodes: int = 1, basis: str | None = None,
              tokens_per_step: int = TOKENS_PER_STEP, setup: Timeline | None = None) -> str:
    """What to show before asking to spend money, e.g. for `fab launch --provision`. basis says where a given
    step time comes from (default: measured); without one it is assumed from the GPU's throughput. setup: a launch's
    measured timeline, whose setup stages replace the assumed setup time."""
    how = basis or "measured"
    if step_seconds is None:
        step_seconds, how = assumed_step_seconds(plan.type_name, plan.gpus, tokens_per_step, nodes=nodes), "assumed"
    head = f"{plan.type_name} x{nodes} in {plan.region}: {dollars(plan.price_cents * nodes)}/hour"
    if step_seconds is None:
        return head + "; no assumed step time for this GPU, so no estimate (pass --step-seconds)"
    setup_hours, setup_how = setup_of(setup)
    hours, cost = estimate_cost(plan.price_cents, steps, step_seconds, nodes, setup_hours=setup_hours)
    return (f"{head}; {steps} steps x {step_seconds:.2f} s ({how}) + {OVERHEAD:.0%} evals/checkpoints + {setup_hours:.2g} h setup "
            f"({setup_how}) = about {hours:.1f} h = about {dollars(cost * 100)}")


def setup_of(tl: Timeline | None) -> tuple[float, str]:
    """Hours of setup a price adds to training, and where they come from: a launch's measured setup stages, else assumed."""
    from infra.timeline import SETUP

    if tl is not None and tl.total(SETUP) > 0:
        return tl.total(SETUP) / 3600, "measured"
    return SETUP_HOURS, "assumed"


def training_line(price_cents: float, steps: int, step_seconds: float | None, nodes: int = 1, basis: str | None = None) -> str:
    """The dry run's training part: the steps at the step time price_basis gives (or assumed), evals and checkpoints."""
    if step_seconds is None:
        return "training: no step time for this GPU, so no estimate (pass --step-seconds)"
    hours, cost = estimate_cost(price_cents, steps, step_seconds, nodes, setup_hours=0)
    return (f"training: {steps} steps x {step_seconds:.2f} s ({basis or 'measured'}) + {OVERHEAD:.0%} evals/checkpoints "
            f"= {hours * 3600:.0f} s = {dollars(cost * 100)}")


def price_basis(job: Job, type_name: str, given: float | None) -> tuple[float | None, str | None]:
    """The step time a price rests on and what it is: --step-seconds (measured), else the recipe's published
    measurement on the instance type it was made on, else None (cost_line assumes one from the GPU's throughput)."""
    if given is not None:
        return given, None
    published = job.card.published  # for the recipe's full run (its first preset), on the hardware it was timed on
    if published and job.preset == job.card.default_preset and type_name == published.on:
        return published.step_seconds, f"{published.source}; until a run of ours measures it, pass --step-seconds"
    return None, None
