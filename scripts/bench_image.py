"""How long from `fab launch` to the trainer's first step, by how the image reaches the box: already there, pulled
from a registry, or built from source.

    python scripts/bench_image.py [--rounds 1] [--steps 2] [--cold-pull]

Runs what the launcher tests run (needs root, Docker, OpenSSH's sshd and docker-registry, the test base image that
scripts/make_test_base_image.sh makes and the local CPU torch wheel): a throwaway sshd on loopback logging in this
user as the box (tests/sshd.py), this machine's Docker engine as the box's, and a real registry on loopback
(tests/registry_server.py). A first launch builds the image from source and prepares the bundled corpus; the image is then
pushed to the registry with make push-image's code (infra.registry.push). Each round then times, in a fresh weights
dir each, the real `fab launch --allow-cpu --preset tiny --steps N`:

  cached   --image REGISTRY/NAME@DIGEST with the image already on the box: no pull, no build
  pulled   the same after every reference to the image is removed from the engine: a real pull by digest. Layers
           the engine holds for other images (the base, and the dependencies of any other build of the same
           requirements) are not transferred again: on a fresh box the whole image is
  built    no --image, after the source tag is removed: `docker build` on the box, with Docker's layer cache warm
           (a fresh box builds every layer: it downloads the CUDA base and torch, minutes)

--cold-pull also times `docker pull` of the same digest into an engine that has none of its layers (a second dockerd,
in a network namespace of its own, where the same registry storage is served on the same address): what a fresh box
adds to the `pulled` line, less that line's own image stage.

Launch-to-first-step is the wall time from starting `fab` to the trainer's first step line in the streamed log; the
image stage is the launch's own timeline (timeline.json in the weights dir), which says how it got the image.
"""

from __future__ import annotations

import glob
import io
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from infra.flavour import DEFAULT  # noqa: E402
from infra.registry import push  # noqa: E402
from job.errors import ArgumentParser, UserError, cli_main, int_arg  # noqa: E402
from registry_server import registry_available, start_registry  # noqa: E402
from sshd import sshd_available, start_sshd  # noqa: E402

BASE = "nanogpt-test-base:bookworm"
NAME = "nanogpt-train-bench"
FIRST_STEP = re.compile(r"\bstep\s+0/\d+\b")
TRAIN = "--n-layer 2 --n-head 2 --n-embd 64 --block-size 64 --seq-len 32 --micro-batch 4 --total-batch-tokens 256 --warmup-steps 5 " \
        "--eval-every 5 --val-steps 2 --sample-num 0 --hellaswag-every 0"


def sh(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"{args} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def torch_wheel() -> Path:
    links = sh("python3", "-m", "pip", "config", "get", "global.find-links", check=False).stdout.strip() or "/opt/wheels"
    found = sorted(glob.glob(f"{links}/torch-2.13.0+cpu-*.whl"))
    if not found:
        raise UserError(f"no local CPU torch 2.13.0 wheel in {links}: put one there (the build would pull GBs of CUDA torch)")
    return Path(found[0])


def launch(box, data: Path, weights: Path, wheels: Path, steps: int, *extra) -> dict:
    """One `fab launch`, streamed: its seconds to the first step and in all, and its timeline's image stage."""
    cmd = [str(Path(sys.executable).parent / "fab"), "launch", "--host", box.address, "--key", box.key_path, "--known-hosts",
           box.known_hosts_path, "--allow-cpu", "--preset", "tiny", "--nproc", "1", "--steps", str(steps), "--wheels", str(wheels),
           "--build-arg", f"BASE_IMAGE={BASE}", "--data-dir", str(data), "--weights-dir", str(weights), "--train-args", TRAIN,
           *map(str, extra)]
    t0 = time.monotonic()
    first = None
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if first is None and FIRST_STEP.search(line):
            first = time.monotonic() - t0
    if proc.wait() != 0 or first is None:
        raise SystemExit(f"fab launch failed ({proc.returncode}):\n{''.join(out)[-4000:]}")
    stages = {s["name"]: s for s in json.loads((weights / "timeline.json").read_text())["stages"]}
    return {"first_step": first, "total": time.monotonic() - t0, "image": stages["image"]["seconds"], "how": stages["image"]["how"],
            "transferred": sum("Pull complete" in line for line in out), "present": sum("Already exists" in line for line in out)}


def drop_containers(image_id: str) -> None:
    """The stopped containers of the launches here that run this image (fab launch removes them at its next start)."""
    names = sh("docker", "ps", "-a", "--filter", f"ancestor={image_id}", "--filter", "status=exited", "--format", "{{.Names}}").stdout.split()
    if names:
        sh("docker", "rm", *names)


def cold_pull(work: Path, reg_config: Path, ref: str) -> tuple[float, int]:
    """Seconds for `docker pull ref` into an engine that has none of its layers: a second dockerd of its own (data root,
    socket) in a network namespace of its own (a second daemon in this one would tear down the first one's bridge),
    with the same registry storage served there on the same address. (seconds, layers pulled)."""
    d = work / "engine"
    d.mkdir()
    sock = d / "docker.sock"
    log = open(d / "dockerd.log", "wb")
    engine = subprocess.Popen(["unshare", "--net", "dockerd", "--data-root", d / "data", "--exec-root", d / "exec", "-H", f"unix://{sock}",
                               "--pidfile", d / "pid", "--bridge", "none", "--iptables=false", "--ip6tables=false"],
                              stdout=log, stderr=subprocess.STDOUT)
    netns = ["nsenter", f"--net=/proc/{engine.pid}/ns/net"]
    served = None
    try:
        for _ in range(120):
            if sh("docker", "-H", f"unix://{sock}", "info", check=False).returncode == 0:
                break
            time.sleep(0.5)
        sh(*netns, "ip", "link", "set", "lo", "up")
        served = subprocess.Popen([*netns, "/usr/bin/docker-registry", "serve", str(reg_config)], stdout=log, stderr=subprocess.STDOUT)
        time.sleep(2)
        t0 = time.monotonic()
        out = sh("docker", "-H", f"unix://{sock}", "pull", ref).stdout
        return time.monotonic() - t0, out.count("Pull complete")
    finally:
        for p in (served, engine):
            if p is not None:
                p.terminate()
                p.wait(timeout=120)
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    p = ArgumentParser(prog="python scripts/bench_image.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int_arg(1), default=1, help="rounds of the three cases (default 1)")
    p.add_argument("--steps", type=int_arg(1), default=2, help="training steps per launch (default 2)")
    p.add_argument("--cold-pull", action="store_true", help="also time a pull into an empty second engine (dockerd in a network "
                                                            "namespace of its own)")
    args = p.parse_args()
    if not (sshd_available() and registry_available() and shutil.which("docker")):
        raise UserError("this needs OpenSSH's sshd, docker-registry and Docker: install them (.ci/run does)")
    sh(ROOT / "scripts" / "make_test_base_image.sh", BASE)
    work = Path(tempfile.mkdtemp(prefix="bench-image-"))
    box = start_sshd(work / "sshd")
    reg = start_registry(work / "registry")
    wheels = work / "wheels"
    wheels.mkdir()
    shutil.copy(torch_wheel(), wheels)
    data = work / "data"
    rows = []
    try:
        warm = launch(box, data, work / "w-warmup", wheels, args.steps)  # builds (or finds) the image, prepares the corpus
        print(f"warm-up launch: image {warm['how']} in {warm['image']:.1f} s, first step after {warm['first_step']:.1f} s")
        events = [json.loads(line) for line in (work / "w-warmup" / "metrics.jsonl").read_text().splitlines() if line.strip()]
        source = next(e for e in events if e["event"] == "start")["identity"]["image"]  # the source tag the launch ran
        image_id = sh("docker", "image", "inspect", "--format", "{{.Id}}", source).stdout.strip()
        sha = sh("git", "-C", ROOT, "rev-parse", "--short", "HEAD").stdout.strip()
        sh("docker", "tag", source, f"{NAME}:{sha}-{DEFAULT.name}")
        t0 = time.monotonic()
        digest = push("docker", f"{reg.host}/bench", NAME, sha, DEFAULT.name, out=io.StringIO())
        print(f"pushed {source} ({image_id[:19]}) to {reg.host}/bench/{NAME}@{digest} in {time.monotonic() - t0:.1f} s")
        pinned = f"{reg.host}/bench/{NAME}@{digest}"
        if args.cold_pull:
            seconds, layers = cold_pull(work, work / "registry" / "config.yml", pinned)
            print(f"cold pull (an engine without any of its layers): {seconds:.1f} s, {layers} layers", flush=True)
        for r in range(args.rounds):
            print(f"round {r + 1}", flush=True)
            rows.append(("cached", launch(box, data, work / f"w-cached-{r}", wheels, args.steps, "--image", pinned)))
            drop_containers(image_id)  # the finished trainer's container holds its image until the next launch
            sh("docker", "rmi", "-f", image_id)  # every tag, and its layers where no other image of the engine holds them
            rows.append(("pulled", launch(box, data, work / f"w-pulled-{r}", wheels, args.steps, "--image", pinned)))
            sh("docker", "rmi", "--no-prune", source, check=False)  # the tag only (if the pull left one): the build finds its layers cached
            rows.append(("built", launch(box, data, work / f"w-built-{r}", wheels, args.steps)))
    finally:
        box.stop()
        reg.stop()
        leftover = [t for t in sh("docker", "images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split() if NAME in t]
        if leftover:
            sh("docker", "rmi", "--no-prune", *leftover, check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{platform.node()}: {platform.processor() or platform.machine()}, launch --allow-cpu --preset tiny --steps {args.steps}")
    print(f"{'case':<8} {'to first step':>14} {'image stage':>12} {'launch':>8}  how (layers pulled / already there)")
    for case, m in rows:
        layers = f" ({m['transferred']} / {m['present']})" if case == "pulled" else ""
        print(f"{case:<8} {m['first_step']:>12.1f} s {m['image']:>10.1f} s {m['total']:>6.1f} s  {m['how']}{layers}")


if __name__ == "__main__":
    cli_main(main)()
