"""`fab launch / logs / status / stop / fetch-weights` end to end: the laptop is this test process running the real
`fab` CLI, the box is a real OpenSSH server on loopback logging in a real non-root user who is in the docker
group, and the box's Docker is this machine's real engine. The image is built *on the box* from the source
that fab sends (a local Debian base and the CPU torch wheel stand in for the CUDA base), or pushed with
`make push-image` to a real registry on loopback (tests/registry_server.py) and pulled from there with --image.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BASE, ENGINE, ROOT, SMALL, SPEEDRUN_SMALL, assert_one_line_error, cpu_torch_wheel, events, run_cli, run_forked, sh
from hub_server import HubServer, make_repo
from job import contract, recipes, stats
from job.errors import UserError
from job.identity import code_hash, git_commit
from registry_server import keep_layers, seed_layers
from sshd import free_port, keygen, sshd_available, start_sshd

pytestmark = [pytest.mark.slow, ENGINE]  # one worker runs them in order (tests/conftest.py)
BOX_USER = "nanogpt-box"  # stands in for Lambda's `ubuntu`: not root, in the docker group
TRAIN = [a for a in SMALL if a not in ("--preset", "tiny", "--device", "cpu")]
# What `--train-args` adds per recipe (fab launch passes --recipe and --preset itself).
TRAIN_ARGS = {"gpt2": TRAIN,
              "speedrun-2025-05-24": [a for a in SPEEDRUN_SMALL
                                      if a not in ("--recipe", "speedrun-2025-05-24", "--preset", "tiny", "--device", "cpu")]}


FAB_PRELOAD = ["fabric.main", "fabfile"]


def fab(*args, timeout=900, env=None, check=False) -> subprocess.CompletedProcess:
    """`fab ARGS` as a user runs it, in a forked child of a server that imported Fabric and the fabfile once."""
    base = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = run_forked([str(Path(sys.executable).parent / "fab"), *map(str, args)], FAB_PRELOAD, base, {**base, **(env or {})},
                      timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"fab {args} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    return proc


BOX_DIRS: list[Path] = []


def box_path(name: str) -> Path:
    """A directory the box user owns on "the box's disk". Not under pytest's tmp dir: pytest keeps
    /tmp/pytest-of-root at 0700 (and resets it when another pytest starts), which the box user cannot enter."""
    d = Path(tempfile.mkdtemp(prefix=f"nanogpt-box-{name}-"))
    user = pwd.getpwnam(BOX_USER)
    shutil.chown(d, user.pw_uid, user.pw_gid)
    BOX_DIRS.append(d)
    return d


@pytest.fixture(scope="module")
def box_user(docker):
    if os.geteuid() != 0:
        pytest.skip(reason="creating the box's login user needs root (CI runs as root)")
    if not sshd_available():
        pytest.skip(reason="openssh-server is not installed (CI installs it in .ci/run)")
    try:
        pwd.getpwnam(BOX_USER)
    except KeyError:
        add_user(BOX_USER, "docker")
    return pwd.getpwnam(BOX_USER)


def add_user(name: str, *groups: str) -> None:
    sh("useradd", "--create-home", "--shell", "/bin/bash", *(["--groups", ",".join(groups)] if groups else []), name)
    sh("usermod", "-p", "*", name)  # useradd leaves the account locked ("!"), which sshd refuses even with a key; "*": no password login


@pytest.fixture(scope="module")
def laptop(tmp_path_factory):
    """The laptop's SSH key and known_hosts (shared by every box of the module)."""
    d = tmp_path_factory.mktemp("laptop")
    keygen(d / "id_ed25519")
    return d


@pytest.fixture(scope="module")
def boxes(box_user, laptop, tmp_path_factory):
    """Two boxes (two sshd ports; one Docker engine) for the single- and multi-node runs."""
    servers = [start_sshd(tmp_path_factory.mktemp(f"sshd{i}"), user=BOX_USER, user_key=laptop / "id_ed25519") for i in range(2)]
    (laptop / "known_hosts").write_text("".join(s.host_public_key_line + "\n" for s in servers))
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    d = tmp_path_factory.mktemp("wheels")
    shutil.copy(cpu_torch_wheel(), d)
    return d


@pytest.fixture(scope="module")
def base_image(docker):
    sh(ROOT / "scripts" / "make_test_base_image.sh", BASE, timeout=900)
    # Earlier runs' source builds would make the first launch skip its build: drop their tags (the layers stay cached).
    tags = [t for t in sh("docker", "images", contract.IMAGE_NAME, "--format", "{{.Repository}}:{{.Tag}}").stdout.split() if ":src-" in t]
    if tags:
        sh("docker", "rmi", "--no-prune", *tags, check=False)
    return BASE


def ssh_args(server, laptop) -> list[str]:
    return ["--host", server.address, "--key", server.key_path, "--known-hosts", laptop / "known_hosts"]


@pytest.fixture(scope="module")
def run_dirs(box_user):
    return {"data": box_path("data"), "weights": box_path("weights")}


def launch_args(server, laptop, wheels, base_image, run_dirs, *extra) -> list[str]:
    return ["launch", *ssh_args(server, laptop), "--allow-cpu", "--preset", "tiny", "--wheels", wheels,
            "--build-arg", f"BASE_IMAGE={base_image}", "--data-dir", run_dirs["data"], "--weights-dir", run_dirs["weights"], *extra]


def docker_ps(label="nanogpt.role=train") -> list[str]:
    return sh("docker", "ps", "--filter", f"label={label}", "--format", "{{.Names}}").stdout.split()


def descendants(pid: int) -> list[int]:
    children = [int(p) for p in sh("pgrep", "-P", pid, check=False).stdout.split()]
    return children + [d for c in children for d in descendants(c)]


def wait_for(pred, timeout=300, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module", autouse=True)
def clean_containers(docker):
    from infra.container import ROLE

    yield
    for d in BOX_DIRS:
        shutil.rmtree(d, ignore_errors=True)
    # Every container the launcher started, whatever its role (train, sync, guard, tensorboard, prepare).
    names = sh("docker", "ps", "-a", "--filter", f"label={ROLE}", "--format", "{{.Names}}").stdout.split()
    if names:
        sh("docker", "rm", "-f", *names, check=False)


# ---- one run, followed from start to stop ---------------------------------------------------------------

def test_launch_builds_on_the_box_prepares_data_and_refuses_a_second_run(boxes, laptop, wheels, base_image, run_dirs, box_user):
    args = launch_args(boxes[0], laptop, wheels, base_image, run_dirs, "--nproc", 2, "--steps", 100000, "--detach",
                       "--train-args", " ".join(TRAIN + ["--checkpoint-every", "20", "--log-every", "1"]))
    proc = fab(*args, check=True)
    out = proc.stdout
    assert "none (CPU)" in out and str(run_dirs["data"]) in out  # the preflight table
    assert "sending the image source" in out and "building nanogpt-train:src-" in out
    assert "data: no complete set of shards" in out and (run_dirs["data"] / "tinyshakespeare").is_dir()  # prepared in the container
    # The data first: the data image (job.prepare without torch) is built, its container starts tokenizing, and only
    # then does the trainer image build; the preparation's end is said after it. The shards belong to the box's user.
    data_tag = re.search(r"building (\S+-data) there first", out).group(1)
    trainer_build = out.index("there (CUDA")
    assert out.index(data_tag) < out.index("data: no complete set of shards") < trainer_build < out.index("data: ready in")
    no_torch = sh("docker", "run", "--rm", "--entrypoint", "python", data_tag, "-c",
                  "import importlib.util, job.prepare; print(importlib.util.find_spec('torch') is None)").stdout
    assert no_torch.strip() == "True"
    assert (run_dirs["data"] / "tinyshakespeare").stat().st_uid == pwd.getpwnam(BOX_USER).pw_uid
    kept = {s["name"]: s for s in json.loads((run_dirs["weights"] / "timeline.json").read_text())["stages"]}
    data, image = kept["data"], kept["image"]
    assert data["start"] < image["start"] < image["start"] + image["seconds"] < data["start"] + data["seconds"]  # beside it
    assert "beside the image" in timeline_line(out, "data")
    assert "started nanogpt-train on 127.0.0.1" in out and "fab logs --host" in out
    assert docker_ps() == ["nanogpt-train"]
    wait_for(lambda: len(events(run_dirs["weights"], "train")) >= 3, what="training steps")
    start = events(run_dirs["weights"], "start")[0]
    assert start["world"] == 2  # --nproc 2: torchrun with two CPU processes
    # The run names what it ran: the image the launcher started (reference and id) and the commit it was built from.
    tag = re.search(r"building (\S+) there \(CUDA", out).group(1)
    ident = start["identity"]
    assert ident["image"] == tag and ident["image_id"] == sh("docker", "image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    assert ident["commit"] == git_commit()[0] and ident["code_sha256"] == code_hash(ROOT / "job")
    # The run goes on until the stop test below; the tests between only watch it (logs, status, the dashboard, a
    # failed build beside it), so its two ranks get a quarter of a core and leave the rest to the suite.
    sh("docker", "update", "--cpus", "0.25", contract.CONTAINER_NAME)

    again = fab(*args)  # the same command again
    assert_one_line_error(again, "already active", "--restart")
    assert "started" not in again.stdout
    assert docker_ps() == ["nanogpt-train"]


def test_a_failed_image_build_leaves_the_started_data_preparation_running_and_says_so(boxes, laptop, wheels, base_image, run_dirs):
    """The trainer image fails to build (its torch index missing) after the data preparation started beside it:
    the launch ends in one line, the preparation goes on (the next launch needs the same shards) and the launch says
    where, and the active run is untouched (--restart stops it only once the new image and data are ready)."""
    data = box_path("data-of-a-failed-build")
    args = launch_args(boxes[0], laptop, wheels, base_image, {**run_dirs, "data": data}, "--restart", "--train-args", " ".join(TRAIN))
    at = args.index(f"BASE_IMAGE={base_image}")
    args[at] += " TORCH_INDEX_URL=file:///no-such-index"  # pip fails at once, with no network retries
    before = set(sh("docker", "ps", "-aq").stdout.split())
    try:
        proc = fab(*args)
        assert_one_line_error(proc, "build")
        # No container is left of the failed build step; the preparation's is the only new one.
        new = set(sh("docker", "ps", "-aq").stdout.split()) - before
        assert sh("docker", "inspect", "--format", "{{.Name}}", *new).stdout.split() == ["/nanogpt-train-prepare"]
        notes = [line for line in proc.stdout.splitlines() if line.startswith("note: the data preparation goes on")]
        assert notes == ["note: the data preparation goes on in the background on 127.0.0.1 (`docker logs -f nanogpt-train-prepare` "
                         "there follows it); the next `fab launch` finds its shards or takes it over where it is"], proc.stdout
        manifest = data / "tinyshakespeare" / contract.PREPARE_MANIFEST
        wait_for(lambda: manifest.exists() and json.loads(manifest.read_text()).get("complete") is True, what="the shards")
        assert docker_ps() == ["nanogpt-train"]  # the run the build test started
    finally:
        sh("docker", "rm", "-f", "nanogpt-train-prepare", check=False)


def test_logs_status_and_a_dropped_connection_while_streaming(boxes, laptop, run_dirs):
    logs = fab("logs", *ssh_args(boxes[0], laptop), "--tail", 5, "--no-follow", check=True)
    assert "| loss " in logs.stdout
    status = fab("status", *ssh_args(boxes[0], laptop), check=True).stdout
    assert "state" in status and "running" in status and "step" in status and "tok_s" in status and "eta" in status
    assert f"code        {git_commit()[0][:12]}" in status  # the commit the image was built from, from the start event

    # Follow the log, then kill the SSH session under it: the streaming ends with one line, the training does not.
    follow = subprocess.Popen([str(Path(sys.executable).parent / "fab"), "logs", *map(str, ssh_args(boxes[0], laptop))], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    while len(seen) < 3:
        line = follow.stdout.readline()
        assert line, follow.stderr.read()
        if "| loss " in line:
            seen.append(line)
    sessions = descendants(boxes[0].proc.pid)  # sshd's per-connection processes and what they run (docker logs -f)
    assert sessions
    for pid in sessions:
        os.kill(pid, signal.SIGKILL)
    _, err = follow.communicate(timeout=60)
    assert follow.returncode != 0
    assert err.strip().startswith("error: lost the SSH connection") and "fab logs --host" in err and len(err.strip().splitlines()) == 1
    assert docker_ps() == ["nanogpt-train"]  # training goes on
    before = len(events(run_dirs["weights"], "train"))
    wait_for(lambda: len(events(run_dirs["weights"], "train")) > before + 2, what="training to go on")

    # Re-attach; Ctrl-C detaches cleanly.
    again = subprocess.Popen([str(Path(sys.executable).parent / "fab"), "logs", *map(str, ssh_args(boxes[0], laptop)), "--tail", "2"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    while "| loss " not in (line := again.stdout.readline()):
        assert line, again.stderr.read()
    again.send_signal(signal.SIGINT)
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert "stopped streaming (Ctrl-C)" in out and "training goes on" in out
    assert docker_ps() == ["nanogpt-train"]


def test_dashboard_forwards_the_boxs_tensorboard_and_ctrl_c_leaves_training_alone(boxes, laptop, run_dirs, tmp_path):
    """fab dashboard: TensorBoard in the image on the box's loopback, reached through the verified SSH connection. The
    forwarded port serves the run's scalars (metrics.jsonl's values), and a headless Chromium renders the loss chart."""
    import urllib.request

    import numpy as np

    def start_dashboard(port: int, sigint: signal.Handlers, *extra) -> tuple[subprocess.Popen, str]:
        """fab dashboard, with what it printed up to its URL."""
        proc = subprocess.Popen([str(Path(sys.executable).parent / "fab"), "dashboard", *map(str, ssh_args(boxes[0], laptop)),
                                 "--local-port", str(port), *map(str, extra)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
        said = ""
        while f"open http://127.0.0.1:{port}/" not in (line := proc.stdout.readline()):
            assert line, proc.stderr.read()
            said += line
        return proc, said

    # Started with SIGINT ignored, as a non-interactive shell starts a background job: Ctrl-C must still end it.
    port = free_port()
    proc, said = start_dashboard(port, signal.SIG_IGN)
    try:
        assert "started nanogpt-train-tensorboard" in said
        assert docker_ps("nanogpt.role=tensorboard") == ["nanogpt-train-tensorboard"]
        # TensorBoard answers on the box's loopback (its container shares the host's network).
        listening = sh("docker", "exec", "nanogpt-train-tensorboard", "python", "-c",
                       "import socket; s = socket.socket(); print(s.connect_ex(('127.0.0.1', 6006)))").stdout.strip()
        assert listening == "0"

        def scalars(tag):
            url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=.&tag={tag}"
            return {step: value for _, step, value in json.loads(urllib.request.urlopen(url, timeout=30).read())}

        served = scalars("loss/train")
        logged = {e["step"]: e["loss"] for e in events(run_dirs["weights"], "train")}
        assert len(served) >= 3 and all(float(np.float32(logged[s])) == v for s, v in served.items())
        page = tmp_path / "dashboard.png"
        # forceSVG: TensorBoard draws its charts as SVG (a headless Chromium without a GPU draws no WebGL lines).
        url = f"http://127.0.0.1:{port}/?forceSVG=true#timeseries"
        chromium = ["chromium", "--headless", "--no-sandbox", "--hide-scrollbars", "--virtual-time-budget=20000"]
        dom = sh(*chromium, "--dump-dom", url, timeout=180).stdout
        assert "loss/train" in dom and "loss/val" in dom and "<path" in dom  # the loss cards, with their lines
        sh(*chromium, "--window-size=1400,1000", f"--screenshot={page}", url, timeout=180)
        assert page.stat().st_size > 20_000
        keep = ROOT / "bench-out"  # git-ignored: the screenshot is kept to be looked at
        keep.mkdir(exist_ok=True)
        shutil.copy(page, keep / "dashboard.png")
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "closed the tunnel" in out and "training goes on" in out
    assert docker_ps() == ["nanogpt-train"]  # training goes on
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)  # the tunnel is closed

    # Again: the box's TensorBoard is reused, and SIGTERM (a process manager's stop) closes the tunnel the same way.
    port = free_port()
    proc, said = start_dashboard(port, signal.SIG_DFL)
    try:
        assert len(scalars("loss/train")) >= 3
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "started" not in said and "closed the tunnel" in out
    assert docker_ps("nanogpt.role=tensorboard") == ["nanogpt-train-tensorboard"] and docker_ps() == ["nanogpt-train"]

    # A remote port another program holds is one line naming it, and the tunnel reaches nothing of that program's.
    with socket.create_server(("127.0.0.1", 0)) as other:
        taken = other.getsockname()[1]
        proc = fab("dashboard", *ssh_args(boxes[0], laptop), "--local-port", free_port(), "--remote-port", taken)
    assert_one_line_error(proc, f"port {taken} ", "taken by another program", "--remote-port")
    assert docker_ps("nanogpt.role=tensorboard") == ["nanogpt-train-tensorboard"]  # the one on 6006 is left as it was
    # Another free one: the dashboard serves there (the TensorBoard on 6006 would be reused only for 6006).
    remote, port = free_port(), free_port()
    proc, said = start_dashboard(port, signal.SIG_DFL, "--remote-port", remote)
    try:
        assert f"started nanogpt-train-tensorboard on 127.0.0.1 (its loopback, port {remote})" in said
        assert len(scalars("loss/train")) >= 3
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_stop_leaves_a_final_checkpoint_and_relaunch_resumes_to_the_end(boxes, laptop, wheels, base_image, run_dirs, box_user):
    proc = fab("stop", *ssh_args(boxes[0], laptop), check=True)
    assert docker_ps() == []
    stopped = [e for e in events(run_dirs["weights"], "end") if e["reason"] == "stopped"]
    assert stopped, "the trainer did not log a stop"
    final = run_dirs["weights"] / contract.CHECKPOINT_FORMAT.format(step=stopped[-1]["step"])
    assert final.is_file() and final.name in proc.stdout
    assert all(p.stat().st_uid == box_user.pw_uid for p in run_dirs["weights"].iterdir())  # the user's files, not root's

    # Same command again (no --restart needed: nothing runs): it resumes and streams to the end.
    end = stopped[-1]["step"] + 6
    proc = fab(*launch_args(boxes[0], laptop, wheels, base_image, run_dirs, "--nproc", 2, "--steps", end,
                            "--train-args", " ".join(TRAIN + ["--checkpoint-every", "20", "--log-every", "1"])), check=True)
    assert "already on 127.0.0.1 (same source): not rebuilding" in proc.stdout
    assert "data: shards found" in proc.stdout
    assert f"resumed from {contract.LOG_DIR}/{final.name}" in proc.stdout or f"resumed from log/{final.name}" in proc.stdout
    assert f"step {end - 1:6d}/{end}" in proc.stdout and f"done: {end} steps" in proc.stdout and "training finished" in proc.stdout
    assert (run_dirs["weights"] / contract.CHECKPOINT_FORMAT.format(step=end)).is_file()


def test_fetch_weights_brings_the_run_home(boxes, laptop, run_dirs, tmp_path):
    first = fab("fetch-weights", *ssh_args(boxes[0], laptop), "--weights-dir", run_dirs["weights"], "--to", tmp_path / "w", check=True)
    names = sorted(p.name for p in run_dirs["weights"].glob(contract.CHECKPOINT_GLOB))
    for n in names:
        assert hashlib.sha256((tmp_path / "w" / n).read_bytes()).digest() == hashlib.sha256((run_dirs["weights"] / n).read_bytes()).digest()
    event_files = list(run_dirs["weights"].glob(contract.TENSORBOARD_EVENTS_PREFIX + "*"))
    assert len(event_files) == 2  # one per attempt: the stopped run and its resumption
    assert f"fetched {len(names) + 3 + len(event_files)} files" in first.stdout
    second = fab("fetch-weights", *ssh_args(boxes[0], laptop), "--weights-dir", run_dirs["weights"], "--to", tmp_path / "w", check=True)
    assert "fetched 0 files (0.0 MiB)" in second.stdout


def test_wandb_key_reaches_the_trainer_as_a_read_only_file_and_is_never_shown(boxes, laptop, wheels, base_image, tmp_path):
    """--wandb through fab launch: the laptop's key (here from ~/.netrc, as `wandb login` leaves it) goes to a 0600 file
    on the box, mounted read-only into the trainer, which runs its W&B run offline in the weights dir."""
    from test_dashboards import inspect_history

    dirs = {"data": box_path("wandb-data"), "weights": box_path("wandb-weights")}
    key = "f0e1d2c3b4a5" * 4  # 48 hex characters, as a W&B key looks
    home = tmp_path / "laptop-home"
    home.mkdir()
    (home / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {key}\n")
    (home / ".netrc").chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["NETRC"] = str(home / ".netrc")
    proc = fab(*launch_args(boxes[0], laptop, wheels, base_image, dirs, "--nproc", 1, "--steps", 6,
                            "--env", "WANDB_MODE=offline WANDB_SILENT=true",
                            "--train-args", " ".join(TRAIN + ["--wandb", "nanogpt-test/box"])), env=env, check=True)
    assert "training finished" in proc.stdout
    mounts = json.loads(sh("docker", "inspect", "--format", "{{json .Mounts}}", "nanogpt-train").stdout)
    (secret,) = [m for m in mounts if m["Destination"] == contract.WANDB_KEY_FILE]
    assert secret["RW"] is False and Path(secret["Source"]).read_text() == key
    assert oct(Path(secret["Source"]).stat().st_mode & 0o777) == "0o600"
    assert_key_kept_secret(key, proc.stdout, proc.stderr)
    assert not [p for p in dirs["weights"].rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    run_id = (dirs["weights"] / contract.WANDB_RUN_ID_FILE).read_text().strip()
    (run_dir,) = (dirs["weights"] / "wandb").glob(f"offline-run-*-{run_id}")
    history = {h["step"]: h["loss/train"] for h in inspect_history(run_dir) if "loss/train" in h}
    assert history == {e["step"]: e["loss"] for e in events(dirs["weights"], "train")} and len(history) == 6


def test_wandb_without_a_key_fails_before_touching_the_box(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["NETRC"] = str(tmp_path / "none")
    proc = subprocess.run([str(Path(sys.executable).parent / "fab"), "launch", "--host", f"u@127.0.0.1:{free_port()}",
                           "--train-args", "--wandb proj"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(proc, "--wandb needs a W&B API key", "wandb login", "WANDB_MODE=offline")


# ---- several boxes --------------------------------------------------------------------------------------

def test_two_nodes_rendezvous_and_train_as_one_job(boxes, laptop, wheels, base_image, tmp_path_factory):
    data, weights = box_path("mn-data"), box_path("mn-weights")
    hosts = ",".join(s.address for s in boxes)
    proc = fab("launch", "--hosts", hosts, "--key", boxes[0].key_path, "--known-hosts", laptop / "known_hosts", "--allow-cpu",
               "--preset", "tiny", "--wheels", wheels, "--build-arg", f"BASE_IMAGE={base_image}", "--data-dir", data, "--weights-dir", weights,
               "--nproc", 1, "--steps", 4, "--master-addr", "127.0.0.1", "--master-port", free_port(), "--env", "GLOO_SOCKET_IFNAME=lo",
               "--train-args", " ".join(TRAIN + ["--log-every", "1"]), check=True)
    out = proc.stdout
    assert "started nanogpt-train-node0 on 127.0.0.1 (node 0 of 2)" in out and "started nanogpt-train-node1 on 127.0.0.1 (node 1 of 2)" in out
    assert "device cpu x 2" in out  # one process on each node, one job: world size 2
    assert "done: 4 steps" in out
    assert events(weights, "start")[0]["world"] == 2
    assert (weights / contract.CHECKPOINT_FORMAT.format(step=4)).is_file()
    node1 = sh("docker", "inspect", "--format", "{{.State.ExitCode}}", "nanogpt-train-node1").stdout.strip()
    assert node1 == "0"


# ---- checkpoints to S3 from the box ---------------------------------------------------------------------

def test_sync_s3_sidecar_uploads_each_checkpoint_and_keeps_the_keys_secret(boxes, laptop, wheels, base_image, tmp_path_factory):
    from moto.server import ThreadedMotoServer

    from job.sidecar.s3 import client

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        secret = "sEcReT-" + hashlib.sha256(os.urandom(8)).hexdigest()[:24]
        env = {"AWS_ACCESS_KEY_ID": "AKIATESTLAUNCH", "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(env)  # for this process's own boto3 client below
        s3 = client(endpoint)
        s3.create_bucket(Bucket="runs")
        data, weights = box_path("s3-data"), box_path("s3-weights")
        proc = fab("launch", *ssh_args(boxes[0], laptop), "--allow-cpu", "--preset", "tiny", "--wheels", wheels, "--build-arg",
                   f"BASE_IMAGE={base_image}", "--data-dir", data, "--weights-dir", weights, "--nproc", 1, "--steps", 6,
                   "--sync-s3", "s3://runs/exp1", "--s3-endpoint", endpoint, "--train-args", " ".join(TRAIN + ["--checkpoint-every", "3"]),
                   env=env, check=True)
        assert "sidecar nanogpt-train-sync uploads each new checkpoint to s3://runs/exp1" in proc.stdout
        wait_for(lambda: not docker_ps("nanogpt.role=sync"), timeout=120, what="the sidecar to finish")
        sidecar_log = sh("docker", "logs", "nanogpt-train-sync").stdout
        assert "training ended and every checkpoint is in S3" in sidecar_log
        for name in ("model_00003.pt", "model_00006.pt"):
            body = s3.get_object(Bucket="runs", Key=f"exp1/{name}")["Body"].read()
            assert hashlib.sha256(body).hexdigest() == hashlib.sha256((weights / name).read_bytes()).hexdigest()
            assert json.loads((weights / f".synced-{name}").read_text())["sha256"] == hashlib.sha256(body).hexdigest()
        assert s3.head_object(Bucket="runs", Key=f"exp1/{contract.METRICS_FILE}")["ContentLength"] > 0
        # The secret is in no output, no container's config, no log; the box keeps it in a 0600 file of the user.
        inspect = sh("docker", "inspect", "nanogpt-train-sync", "nanogpt-train").stdout
        for text in (proc.stdout, proc.stderr, inspect, sidecar_log, sh("docker", "logs", "nanogpt-train").stdout):
            assert secret not in text
        creds = Path(pwd.getpwnam(BOX_USER).pw_dir) / ".config/nanogpt/aws-credentials"
        assert creds.stat().st_mode & 0o777 == 0o600 and creds.stat().st_uid == pwd.getpwnam(BOX_USER).pw_uid
    finally:
        server.stop()
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            os.environ.pop(k, None)


# ---- failures: one clear line each, nothing started -----------------------------------------------------

def test_unknown_host_key_wrong_key_and_closed_port(boxes, laptop, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    proc = fab("launch", "--host", boxes[0].address, "--key", boxes[0].key_path, "--known-hosts", empty, "--allow-cpu")
    assert_one_line_error(proc, "unknown host key", "--accept-new-host-key")
    keygen(tmp_path / "other")
    proc = fab("status", "--host", boxes[0].address, "--key", tmp_path / "other", "--known-hosts", laptop / "known_hosts")
    assert_one_line_error(proc, "authentication failed", "--key")
    proc = fab("logs", "--host", f"{BOX_USER}@127.0.0.1:{free_port()}", "--key", boxes[0].key_path, "--known-hosts", laptop / "known_hosts")
    assert_one_line_error(proc, "connection refused", "--port")


def test_no_gpu_without_allow_cpu_and_unwritable_data_dir(boxes, laptop, tmp_path):
    proc = fab("launch", *ssh_args(boxes[0], laptop))
    assert_one_line_error(proc, "no NVIDIA GPU found", "--allow-cpu")
    locked = Path(tempfile.mkdtemp(prefix="nanogpt-root-owned-"))
    locked.chmod(0o755)
    BOX_DIRS.append(locked)
    proc = fab("launch", *ssh_args(boxes[0], laptop), "--allow-cpu", "--data-dir", locked / "data")
    assert_one_line_error(proc, "data dir", "is not writable by nanogpt-box", "chown")
    proc = fab("launch", *ssh_args(boxes[0], laptop), "--allow-cpu", "--fs", "no-such-fs")
    assert_one_line_error(proc, "no persistent filesystem named 'no-such-fs'", "--data-dir")


def test_box_without_docker(box_user, laptop, tmp_path):
    # The box user's PATH holds no docker, as on a machine where it was never installed.
    bare = Path(tempfile.mkdtemp(prefix="nodocker-bin-"))
    bare.chmod(0o755)
    BOX_DIRS.append(bare)
    for tool in ("sh", "bash", "true", "printf", "id", "nproc", "mkdir", "touch", "rm"):
        os.symlink(shutil.which(tool), bare / tool)
    server = start_sshd(tmp_path / "sshd", user=BOX_USER, user_key=laptop / "id_ed25519", extra_config=f"SetEnv PATH={bare}\n")
    try:
        kh = tmp_path / "kh"
        kh.write_text(server.host_public_key_line + "\n")
        proc = fab("launch", "--host", server.address, "--key", server.key_path, "--known-hosts", kh, "--allow-cpu")
        assert_one_line_error(proc, "docker is not installed on 127.0.0.1")
    finally:
        server.stop()


def test_user_not_in_docker_group(box_user, laptop, tmp_path, docker):
    user = "nanogpt-nodocker"
    try:
        pwd.getpwnam(user)
    except KeyError:
        add_user(user)
    server = start_sshd(tmp_path / "sshd", user=user, user_key=laptop / "id_ed25519")
    try:
        kh = tmp_path / "kh"
        kh.write_text(server.host_public_key_line + "\n")
        proc = fab("launch", "--host", server.address, "--key", server.key_path, "--known-hosts", kh, "--allow-cpu")
        assert_one_line_error(proc, f"user {user} on 127.0.0.1 may not use Docker", "usermod -aG docker")
    finally:
        server.stop()


def test_fs_name_is_found_where_lambda_mounts_it(boxes, laptop):
    from infra.box import preflight
    from infra.ssh import connect

    home = Path(pwd.getpwnam(BOX_USER).pw_dir)
    fs = home / f"fs-{os.getpid()}"  # older Lambda images mount persistent storage at ~/NAME
    fs.mkdir()
    shutil.chown(fs, BOX_USER, BOX_USER)
    BOX_DIRS.append(fs)
    conn = connect(boxes[0].address, key=boxes[0].key_path, known_hosts=str(laptop / "known_hosts"))
    with conn:
        box = preflight(conn, fs=fs.name, weights_dir=str(box_path("fs-weights")), allow_cpu=True)
    assert box.data_dir == str(fs) and box.persistent and box.uid == pwd.getpwnam(BOX_USER).pw_uid


@pytest.mark.parametrize("code,says", [(0, None), (3, "exited with status 3: training diverged"),
                                       (2, "exited with status 2: a problem the user can fix"), (137, "exited with status 137: killed by SIGKILL"),
                                       (4, "exited with status 4: a rank lost contact with another"), (1, "exited with status 1: a failure")])
def test_follow_says_what_the_trainers_exit_status_means(boxes, laptop, base_image, code, says):
    """job.supervisor passes the trainer's own status on (2: a user mistake, 3: diverged); `fab launch` explains it."""
    from infra.launch import follow
    from infra.ssh import connect

    name = f"nanogpt-exit-{code}-{os.getpid()}"
    sh("docker", "run", "-d", "--name", name, "--label", "nanogpt.role=train", base_image, "sh", "-c",
       f"echo the trainer says goodbye; exit {code}")
    out = io.StringIO()
    try:
        with connect(boxes[0].address, key=boxes[0].key_path, known_hosts=str(laptop / "known_hosts")) as conn:
            if says is None:
                assert follow(conn, "docker", name, "ubuntu@box", out=out) == 0
                assert "training finished on" in out.getvalue()
            else:
                with pytest.raises(UserError) as e:
                    follow(conn, "docker", name, "ubuntu@box", out=out)
                assert says in str(e.value)
    finally:  # a stopped trainer container left behind is what a later `fab status` on this box would show
        sh("docker", "rm", "-f", name)
    assert "the trainer says goodbye" in out.getvalue()


# ---- the image by pull: make push-image, then fab launch --image, against a real registry on loopback ----------------
E2E_NAME = "nanogpt-train-e2e"  # the name push-image pushes here (the engine may hold a user's nanogpt-train of this commit)


@pytest.fixture(scope="module")
def pushed(registry, boxes, laptop, wheels, base_image):
    """The image the launches here build on the box (found, when an earlier test built it), tagged as build-image tags it
    and pushed with `make push-image`: (its repository in the registry, the commit, the digest printed, the source tag)."""
    from infra.image import build_on_box
    from infra.ssh import connect

    with connect(boxes[0].address, key=boxes[0].key_path, known_hosts=str(laptop / "known_hosts")) as conn:
        source = build_on_box(conn, "docker", build_args={"BASE_IMAGE": base_image}, wheels=str(wheels), out=io.StringIO()).ref
    sha = sh("git", "rev-parse", "--short", "HEAD", cwd=ROOT).stdout.strip()
    sh("docker", "tag", source, f"{E2E_NAME}:{sha}-cu130")
    # Its data image, as make build-image tags one: the trainer image stands in (it has job.prepare too), so the push
    # sends no layer more; the launch by tag pulls it first all the same. The data image itself (no torch) is the
    # build test's.
    sh("docker", "tag", source, f"{E2E_NAME}:{sha}-cu130-data")
    # As a team's registry would, it holds the layers of this repository's push in an earlier test run (none the first
    # time): the push sends only the layers that changed, as after a code change (registry_server.seed_layers).
    seed_layers(registry, f"team/{E2E_NAME}")
    proc = sh("make", "--no-print-directory", "-C", ROOT, "push-image", f"PYTHON={sys.executable}", f"NAME={E2E_NAME}",
              f"REGISTRY={registry.host}/team", timeout=1200)
    digest = re.search(r"^pushed \S+ and :cu130: digest (sha256:[0-9a-f]{64})$", proc.stdout, re.M).group(1)
    keep_layers(registry, f"team/{E2E_NAME}")
    yield f"{registry.host}/team/{E2E_NAME}", sha, digest, source
    refs = [r for r in sh("docker", "images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split() if E2E_NAME in r]
    if refs:
        sh("docker", "rmi", "--no-prune", *refs, check=False)


def image_id_of(ref: str) -> str | None:
    proc = sh("docker", "image", "inspect", "--format", "{{.Id}}", ref, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def timeline_line(out: str, stage: str) -> str:
    lines = out.splitlines()
    return next(line for line in lines[lines.index("timeline:") + 1:] if line.split()[0] == stage)


def test_launch_by_image_pulls_the_pushed_digest_and_builds_nothing(pushed, boxes, laptop, wheels, base_image, run_dirs, box_user):
    repo, sha, digest, source = pushed
    weights, data = box_path("pulled-weights"), box_path("pulled-data")
    args = launch_args(boxes[0], laptop, wheels, base_image, {"data": data, "weights": weights}, "--image", f"{repo}:{sha}",
                       "--nproc", 1, "--steps", 2, "--train-args", " ".join(TRAIN))
    # The dry run shows the data image pulled first, the pull as a step of its own, and the build it would fall back to.
    plan = fab(*args, "--dry-run", check=True).stdout
    assert f"in the background while the trainer image is pulled: in the data image {repo}:{sha}-cu130-data, pulled first" in plan, plan
    assert f"image: CUDA flavour cu130 (CUDA 13.0): docker pull {repo}:{sha}-cu130 on the box, then run by the digest" in plan, plan
    assert f"  if the pull fails: {source} is already on the box" in plan, plan

    proc = fab(*args, check=True)
    out = proc.stdout
    assert f"pulling {repo}:{sha}-cu130 on 127.0.0.1" in out and f"pulled {repo}@{digest} on 127.0.0.1" in out
    # The data image (pushed beside the trainer image) came first, and the data was prepared in it during the pull.
    assert (out.index(f"pulling the data image {repo}:{sha}-cu130-data on 127.0.0.1") < out.index("data: no complete set of shards")
            < out.index(f"pulling {repo}:{sha}-cu130 on 127.0.0.1") < out.index("data: ready in")), out
    assert (data / "tinyshakespeare").is_dir() and "note: no data image" not in out
    assert "note: pull" not in out and "sending the image source" not in out and "not rebuilding" not in out  # no build at all
    assert "trainer image pulled from the registry" in timeline_line(out, "image")
    kept = json.loads((weights / "timeline.json").read_text())
    assert next(s for s in kept["stages"] if s["name"] == "image")["how"] == "pulled"
    # The run ran the digest (what it records), and the trainer image on the box is that image.
    ident = events(weights, "start")[0]["identity"]
    assert ident["image"] == f"{repo}@{digest}" and ident["image_id"] == image_id_of(f"{contract.IMAGE_NAME}:latest")
    assert "done: 2 steps" in out

    # By digest, once the box has it: nothing to pull (a digest names its content for good).
    plan = fab(*launch_args(boxes[0], laptop, wheels, base_image, {"data": run_dirs["data"], "weights": weights}, "--image",
                            f"{repo}@{digest}", "--dry-run"), check=True).stdout
    assert f"image: CUDA flavour cu130 (CUDA 13.0): {repo}@{digest} is already on the box: no pull" in plan, plan


def file_manifest_under(registry, repo: str, content_of: str) -> str:
    """Make the registry serve the manifest `content_of` (a digest it holds) under a digest that is not its hash, as a
    corrupt or lying registry would: the blob store and the repository's revision link, as the registry writes them."""
    wrong = "sha256:" + hashlib.sha256(b"not this manifest").hexdigest()
    blob = registry.blob_path(wrong)
    blob.parent.mkdir(parents=True)
    shutil.copy(registry.blob_path(content_of), blob)
    link = registry.root / "docker" / "registry" / "v2" / "repositories" / repo / "_manifests" / "revisions" / "sha256" / wrong[7:] / "link"
    link.parent.mkdir(parents=True)
    link.write_text(wrong)
    return wrong


def test_a_wrong_digest_or_an_unreachable_registry_is_one_line_and_the_box_builds(pushed, registry, boxes, laptop, wheels, base_image,
                                                                                  run_dirs, box_user):
    from infra.flavour import DEFAULT
    from infra.image import pull_images
    from infra.ssh import connect

    repo, sha, digest, source = pushed
    # The base image in the same repository (its layers are the trainer's first ones: only its manifest is new).
    sh("docker", "tag", base_image, f"{repo}:base")
    pushed_base = sh("docker", "push", f"{repo}:base").stdout
    base_digest = re.search(r"digest: (sha256:[0-9a-f]{64})", pushed_base).group(1)
    sh("docker", "rmi", "--no-prune", f"{repo}:base")
    wrong = file_manifest_under(registry, f"team/{E2E_NAME}", base_digest)
    assert registry.digest(f"team/{E2E_NAME}", wrong) == wrong  # the registry does serve it under that digest
    unreachable = f"127.0.0.1:{free_port()}/team/{E2E_NAME}"
    # A build context that a data image's build left on the box for the trainer image's build: the trainer image is
    # found there instead, and the context goes all the same.
    from infra.image import context_digest
    left = Path(box_user.pw_dir, ".cache/nanogpt/build", f"src-{context_digest(str(wheels))[0][:12]}")
    sh("runuser", "-u", BOX_USER, "--", "mkdir", "-p", left)
    sh("runuser", "-u", BOX_USER, "--", "touch", left / ".complete")
    for i, (image, why, data_note) in enumerate([
            (f"{repo}@{wrong}", f"manifest verification failed for digest {wrong}",
             f"note: --image {repo}@{wrong} is a digest, which names no data image"),
            (f"{unreachable}:{sha}", "connection refused", f"note: no data image {unreachable}:{sha}-cu130-data to pull (")]):
        weights, data = box_path(f"fallback-{i}"), box_path(f"fallback-data-{i}")
        proc = fab(*launch_args(boxes[0], laptop, wheels, base_image, {"data": data, "weights": weights}, "--image", image,
                                "--nproc", 1, "--steps", 1, "--train-args", " ".join(TRAIN)), check=True)
        out = proc.stdout
        # No data image to pull: one line, and the data is prepared in the trainer image once the build has made it.
        assert data_note in out and "the data is prepared once the trainer image is there" in out
        assert out.index("not rebuilding") < out.index("data: no complete set of shards") < out.index("data: ready in")
        asked = image if "@" in image else f"{image}-cu130"
        notes = [line for line in out.splitlines() if line.startswith("note: pull")]
        assert len(notes) == 1 and notes[0].startswith(f"note: pull of {asked} failed (") and notes[0].endswith("): building on the box"), out
        assert why in notes[0], notes[0]
        assert not [line for line in out.splitlines() if line.startswith("Error")]  # docker's error is the reason in that line
        assert f"image {source} is already on 127.0.0.1 (same source): not rebuilding" in out  # the build as without --image
        assert not left.exists()
        assert "trainer image already on the box" in timeline_line(out, "image") and "done: 1 steps" in out
        # Nothing half-loaded: no image by the wrong digest, the trainer image is the one built from source.
        assert image_id_of(f"{repo}@{wrong}") is None
        assert image_id_of(f"{contract.IMAGE_NAME}:latest") == image_id_of(source) != image_id_of(base_image)
        assert events(weights, "start")[0]["identity"]["image"] == source

    # A digest the registry does not have (a typo, another registry's): the same one line, from the pull itself.
    absent = "sha256:" + hashlib.sha256(b"no such manifest").hexdigest()
    out = io.StringIO()
    with connect(boxes[0].address, key=boxes[0].key_path, known_hosts=str(laptop / "known_hosts")) as conn:
        assert pull_images([(conn, "docker")], f"{repo}@{absent}", DEFAULT, out=out) is None
    assert out.getvalue().splitlines()[-1].startswith(f"note: pull of {repo}@{absent} failed (") and "manifest unknown" in out.getvalue()
    assert image_id_of(f"{repo}@{absent}") is None


@pytest.fixture
def second_engine(docker):
    """Another Docker engine on this machine (own data root and socket): a box that does not have our images."""
    d = Path(tempfile.mkdtemp(prefix="nanogpt-engine-"))
    sock = d / "docker.sock"
    log = open(d / "dockerd.log", "wb")
    # In a network namespace of its own (unshare --net; `ip netns exec` would also hide the cgroup mounts): a second
    # daemon in the host's namespace tears down the first one's docker0 bridge. `docker load` needs no network.
    cmd = ["unshare", "--net", "dockerd", "--data-root", d / "data", "--exec-root", d / "exec", "-H", f"unix://{sock}",
           "--pidfile", d / "pid", "--bridge", "none", "--iptables=false", "--ip6tables=false"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: sh("docker", "-H", f"unix://{sock}", "info", check=False).returncode == 0, timeout=60, what="the second dockerd")
        d.chmod(0o755)
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(d, ignore_errors=True)


def test_ship_streams_the_local_image_into_the_boxs_engine_once(box_user, laptop, second_engine, base_image, tmp_path):
    from infra.image import ship_to_box
    from infra.ssh import connect

    server = start_sshd(tmp_path / "sshd", user=BOX_USER, user_key=laptop / "id_ed25519", extra_config=f"SetEnv DOCKER_HOST=unix://{second_engine}\n")
    try:
        kh = tmp_path / "kh"
        kh.write_text(server.host_public_key_line + "\n")
        local_id = sh("docker", "image", "inspect", "--format", "{{.Id}}", base_image).stdout.strip()
        with connect(server.address, key=server.key_path, known_hosts=str(kh)) as conn:
            out = io.StringIO()
            assert ship_to_box(conn, "docker", base_image, out=out) == base_image
            assert "shipping nanogpt-test-base:bookworm" in out.getvalue() and "Loaded image" in out.getvalue()
            remote_id = sh("docker", "-H", f"unix://{second_engine}", "image", "inspect", "--format", "{{.Id}}", base_image).stdout.strip()
            assert remote_id == local_id
            again = io.StringIO()
            ship_to_box(conn, "docker", base_image, out=again)
            assert "already has nanogpt-test-base:bookworm" in again.getvalue() and "not shipping" in again.getvalue()
    finally:
        server.stop()


# ---- Lambda Cloud: provision, and the cost guard on the box ---------------------------------------------

@pytest.fixture
def fake_lambda():
    from fake_lambda import FakeLambda

    with FakeLambda(boot_polls=1) as api:
        yield api


def wait_terminated(fake, iid: str, timeout=180):
    wait_for(lambda: fake.instances[iid]["status"] == "terminated", timeout=timeout, what=f"the guard to terminate {iid}")


def assert_key_kept_secret(key: str, *texts: str):
    for text in texts:
        assert key not in text
    for name in sh("docker", "ps", "-a", "--filter", "label=nanogpt.role", "--format", "{{.Names}}").stdout.split():
        assert key not in sh("docker", "inspect", name).stdout and key not in sh("docker", "logs", name).stdout


def test_provision_launch_and_terminate_when_the_final_checkpoint_is_in_s3(fake_lambda, boxes, laptop, wheels, base_image, tmp_path):
    """`fab launch --provision` from nothing: fake Lambda API + real sshd as the new box + real Docker + moto S3."""
    from fake_lambda import A10, TEST_KEY
    from moto.server import ThreadedMotoServer

    from job.sidecar.s3 import client

    s3_server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3_server.start()
    env = {"LAMBDA_API_KEY": TEST_KEY, "LAMBDA_API_BASE": fake_lambda.url, "AWS_ACCESS_KEY_ID": "AKIATESTGUARD",
           "AWS_SECRET_ACCESS_KEY": "guard-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        endpoint = "http://{}:{}".format(*s3_server.get_host_and_port())
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        s3 = client(endpoint)
        s3.create_bucket(Bucket="runs")
        known = tmp_path / "known_hosts"  # a new box: nothing known about it yet
        known.write_text("")
        proc = fab("launch", "--provision", "--type", A10, "--ssh-key", "laptop", "--yes", "--ssh-user", BOX_USER, "--port", boxes[0].port,
                   "--key", boxes[0].key_path, "--known-hosts", known, "--allow-cpu", "--preset", "tiny", "--steps", 4, "--wheels", wheels,
                   "--build-arg", f"BASE_IMAGE={base_image}", "--data-dir", box_path("pv-data"), "--weights-dir", (w := box_path("pv-weights")),
                   "--nproc", 1, "--sync-s3", "s3://runs/pv", "--s3-endpoint", endpoint, "--terminate-when-done", "--guard-poll", 1,
                   "--train-args", " ".join(TRAIN + ["--checkpoint-every", "2"]), env=env, check=True)
        (iid,) = fake_lambda.instances
        out = proc.stdout
        assert "gpu_1x_a10 x1 in us-south-1: $0.75/hour" in out and "about $" in out  # price and estimate before launching
        assert "launched gpu_1x_a10 in us-south-1" in out and "first contact with nanogpt-box@127.0.0.1" in out
        assert "cost guard nanogpt-train-guard on the box terminates the instance" in out and "done: 4 steps" in out
        assert f"[127.0.0.1]:{boxes[0].port}" in known.read_text()  # accept-new recorded the new box's key
        # The timeline: each stage once, in order (no compile on CPU, no fetch with S3), then the bill at the live price.
        lines = out.splitlines()
        at = lines.index("timeline:")
        shown = [line.split("  ")[1].strip() for line in lines[at + 1:at + 7]]
        assert shown == ["boot", "preflight", "image", "data", "first step", "training"], lines[at:]
        kept = json.loads((w / "timeline.json").read_text())  # in the run's log dir on the box
        # Setup is the wall time of its stages: the data was prepared beside the image (here: in the trainer image, which
        # the box had), and that time is billed once.
        spans = sorted((s["start"], s["start"] + s["seconds"]) for s in kept["stages"] if s["name"] in ("boot", "preflight", "image", "data"))
        setup, reach = 0.0, 0.0
        for start, end in spans:
            setup, reach = setup + max(0.0, end - max(start, reach)), max(reach, end)
        data, image = (next(s for s in kept["stages"] if s["name"] == n) for n in ("data", "image"))
        assert data["start"] < image["start"] + image["seconds"] and setup < sum(e - s for s, e in spans)
        training = next(s["seconds"] for s in kept["stages"] if s["name"] == "training")
        bill = re.fullmatch(r"cost of this launch: setup (\d+) s = \$([\d.]+) \+ training (\d+) s = \$([\d.]+), at \$0\.75/hour x1: \$([\d.]+)",
                            lines[at + 7])
        assert bill, lines[at + 7]
        assert int(bill[1]) == round(setup) and float(bill[2]) == pytest.approx(setup / 3600 * 0.75, abs=0.006)
        assert int(bill[3]) == round(training) and float(bill[4]) == pytest.approx(training / 3600 * 0.75, abs=0.006)
        assert float(bill[5]) == pytest.approx((setup + training) / 3600 * 0.75, abs=0.006)
        assert kept["recipe"] == "gpt2" and kept["preset"] == "tiny" and kept["type_name"] == A10
        assert [s["name"] for s in kept["stages"]] == shown and all(s["seconds"] >= 0 for s in kept["stages"])
        seconds = {s["name"]: s["seconds"] for s in kept["stages"]}
        assert seconds["first step"] <= seconds["training"]  # the trainer's clock, inside the training the laptop timed
        status = fab("status", *ssh_args(boxes[0], laptop), check=True).stdout.splitlines()
        assert any(line.strip() == "timeline" for line in status), status
        assert [line.split()[0] for line in status if line.startswith("    ")][:4] == ["boot", "preflight", "image", "data"], status
        wait_terminated(fake_lambda, iid)
        body = s3.get_object(Bucket="runs", Key="pv/model_00004.pt")["Body"].read()  # the final checkpoint was safe first
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256((w / "model_00004.pt").read_bytes()).hexdigest()
        terminate = fake_lambda.calls("POST", "/instance-operations/terminate")
        assert [c.body for c in terminate] == [{"instance_ids": [iid]}] and all(c.auth_ok for c in terminate)
        assert fake_lambda.problems == []
        assert_key_kept_secret(TEST_KEY, proc.stdout, proc.stderr)
    finally:
        s3_server.stop()
        for k in env:
            os.environ.pop(k, None)


def test_max_hours_stops_training_fetches_home_then_terminates(fake_lambda, boxes, laptop, wheels, base_image, tmp_path):
    """A box provisioned earlier (found by its IP), no S3: at --max-hours the trainer checkpoints and stops, launch
    brings the weights to this disk (marking them on the box), and only then does the guard terminate the instance."""
    from fake_lambda import TEST_KEY

    box = fake_lambda.add_instance("earlier-box")
    w = box_path("mh-weights")
    proc = fab(*launch_args(boxes[0], laptop, wheels, base_image, {"data": box_path("mh-data"), "weights": w}, "--nproc", 1,
                            "--steps", 100000, "--max-hours", 0.0001, "--terminate-when-done", "--guard-poll", 1,
                            "--fetch-to", tmp_path / "home", "--train-args", " ".join(TRAIN)),
               env={"LAMBDA_API_KEY": TEST_KEY, "LAMBDA_API_BASE": fake_lambda.url}, check=True)
    stopped = events(w, "end")
    assert [e["reason"] for e in stopped] == ["stopped"] and ".stop-request in" in proc.stdout
    final = contract.CHECKPOINT_FORMAT.format(step=stopped[0]["step"])
    assert (tmp_path / "home" / final).read_bytes() == (w / final).read_bytes()
    assert (w / f".fetched-{final}").read_text() == hashlib.sha256((w / final).read_bytes()).hexdigest()
    # A box found by its address: no boot stage, the live price from the API, the fetch home last; the timeline goes
    # home with the weights, for the next --provision's dry run.
    kept = json.loads((w / "timeline.json").read_text())
    assert [s["name"] for s in kept["stages"]] == ["preflight", "image", "data", "first step", "training", "fetch"]
    assert (tmp_path / "home" / "timeline.json").read_text() == (w / "timeline.json").read_text()
    price = box["instance_type"]["price_cents_per_hour"] / 100
    assert re.search(rf"^cost of this launch: setup \d+ s = \$[\d.]+ \+ training \d+ s = \$[\d.]+, at \${price:.2f}/hour x1: ", proc.stdout,
                     re.MULTILINE), proc.stdout[-2000:]
    wait_terminated(fake_lambda, box["id"])
    # The guard records the state once the API's answer is back, a moment after the API has it.
    wait_for(lambda: json.loads((w / ".guard-status").read_text())["state"] == "terminated", timeout=30,
             what="the guard to record the termination")
    assert fake_lambda.problems == []
    assert_key_kept_secret(TEST_KEY, proc.stdout, proc.stderr)


def test_an_interrupted_preparation_is_not_taken_for_data(boxes, laptop):
    from infra.box import preflight
    from infra.container import Job, has_shards
    from infra.ssh import connect
    from job.prepare import MANIFEST

    data = box_path("partial")
    shards = data / "edu_fineweb10B"
    shards.mkdir()
    for name in ("edufineweb_val_000000.npy", "edufineweb_train_000001.npy"):
        (shards / name).write_bytes(b"\x93NUMPY")
    with connect(boxes[0].address, key=boxes[0].key_path, known_hosts=str(laptop / "known_hosts")) as conn:
        box = preflight(conn, data_dir=str(data), weights_dir=str(box_path("partial-w")), allow_cpu=True)
        tokenized = Job(preset="gpt2", data="tokenize")
        assert has_shards(conn, box, tokenized)  # shards made elsewhere (no manifest) count as they are
        (shards / MANIFEST).write_text(json.dumps({"complete": False, "shards": []}))
        assert not has_shards(conn, box, tokenized)  # prepare stopped half way: run it again (it resumes)
        (shards / MANIFEST).write_text(json.dumps({"complete": True, "shards": []}))
        assert has_shards(conn, box, tokenized)

        # downloaded .bin shards count when the download finished and holds enough train tokens for this run
        hub = Job(preset="tiny", data="hub", steps=100)
        bins = data / hub.data_subdir
        bins.mkdir()
        assert not has_shards(conn, box, hub)
        for name in ("finewebedu_val_000000.bin", "finewebedu_train_000001.bin"):
            (bins / name).write_bytes(b"\0" * 1024)
        assert has_shards(conn, box, hub)
        (bins / MANIFEST).write_text(json.dumps({"complete": True, "train_tokens": hub.train_tokens() - 1, "shards": []}))
        assert not has_shards(conn, box, hub)  # a download sized to a shorter run: download the rest
        (bins / MANIFEST).write_text(json.dumps({"complete": True, "train_tokens": hub.train_tokens(), "shards": []}))
        assert has_shards(conn, box, hub)


def test_stop_by_hand_pauses_a_guarded_run_without_terminating(fake_lambda, boxes, laptop, wheels, base_image, tmp_path):
    from fake_lambda import TEST_KEY

    box = fake_lambda.add_instance("paused-box")
    w = box_path("pause-weights")
    env = {"LAMBDA_API_KEY": TEST_KEY, "LAMBDA_API_BASE": fake_lambda.url}
    fab(*launch_args(boxes[0], laptop, wheels, base_image, {"data": box_path("pause-data"), "weights": w}, "--nproc", 1, "--steps", 100000,
                     "--terminate-when-done", "--guard-poll", 1, "--detach", "--train-args", " ".join(TRAIN)), env=env, check=True)
    wait_for(lambda: len(events(w, "train")) >= 3, what="training steps")
    proc = fab("stop", *ssh_args(boxes[0], laptop), check=True)
    assert "the cost guard is stopped too" in proc.stdout
    assert [e["reason"] for e in events(w, "end")] == ["stopped"]
    time.sleep(3)  # three of the guard's polls, had it still been running
    assert box["status"] == "active" and fake_lambda.calls("POST", "/instance-operations/terminate") == []
    assert not docker_ps("nanogpt.role=guard")


def test_sync_s3_without_aws_credentials_fails_before_touching_the_box(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.run([str(Path(sys.executable).parent / "fab"), "launch", "--host", f"u@127.0.0.1:{free_port()}", "--sync-s3", "s3://b/p"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(proc, "--sync-s3 needs AWS credentials", "aws configure")  # not "connection refused": checked first


@pytest.mark.parametrize("args, line", [
    (["launch", "--host", "u@127.0.0.1", "--nproc", "abc"], "error: --nproc takes a whole number, got 'abc'"),
    (["launch", "--host", "u@127.0.0.1", "--steps", "0"], "error: --steps must be at least 1, got '0'"),
    (["launch", "--host", "u@127.0.0.1", "--max-hours", "soon"], "error: --max-hours takes a number, got 'soon'"),
    (["launch", "--host", "u@127.0.0.1", "--master-port", "x"], "error: --master-port takes a whole number, got 'x'"),
    (["launch", "--host", "u@127.0.0.1", "--recipe", "nope"], "error: --recipe must be one of gpt2, speedrun, speedrun-2025-05-24, got 'nope'"),
    (["launch", "--host", "u@127.0.0.1", "--data", "web"], "error: --data 'web': choose one of hub, tokenize, bundled"),
    (["launch", "--host", "u@127.0.0.1", "--runs", "0"], "error: --runs must be at least 1, got '0'"),
    (["launch", "--host", "u@127.0.0.1", "--runs", "two"], "error: --runs takes a whole number, got 'two'"),
    (["launch", "--hosts", "u@127.0.0.1,u@127.0.0.2", "--runs", "2"], "error: --runs trains on one box: pass --host, not --hosts"),
    (["launch", "--host", "u@127.0.0.1", "--runs", "2", "--sync-s3", "s3://b/p"],
     "error: --runs trains in sub-directories of the weights dir (seed-S), which the S3 sidecar does not upload: leave out "
     "--sync-s3, or --runs"),
    (["launch", "--host", "u@127.0.0.1", "--runs", "2", "--max-hours", "1"],
     "error: --runs trains in sub-directories of the weights dir (seed-S), which the cost guard does not watch: leave out "
     "--terminate-when-done and --max-hours, or --runs"),
    (["status", "--host", "u@127.0.0.1", "--port", "ssh"], "error: --port takes a whole number, got 'ssh'"),
    (["stop", "--host", "u@127.0.0.1", "--timeout", "long"], "error: --timeout takes a whole number, got 'long'"),
    (["provision", "--type", "t", "--ssh-key", "k", "--ssh-port", "x"], "error: --ssh-port takes a whole number, got 'x'"),
])
def test_numeric_flags_are_checked_before_anything_happens(args, line):
    # Nothing listens anywhere here: the flag must be refused before any connection is tried.
    proc = fab(*args, env={"LAMBDA_API_KEY": "k", "LAMBDA_API_BASE": f"http://127.0.0.1:{free_port()}"}, timeout=60)
    assert assert_one_line_error(proc) == line


# ---- from nothing to weights on the laptop, data from the hub ---------------------------------------------------
HUB_TOKEN = "hf_e2eTokenThatMustStaySecret"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The hub's datasets of both recipes, cut from the bundled corpus, served over the hub's protocol on loopback
    (the download container uses the host's network, so it reaches it as it would reach the hub)."""
    repos = {}
    for spec in contract.HUB_SHARDS.values():
        d = tmp_path_factory.mktemp(spec.prefix)
        make_repo(d, spec.prefix)
        repos[spec.repo] = d
    server = HubServer(repos, token=HUB_TOKEN)
    yield server
    server.stop()


BENCH_ENV = "NANOGPT_BENCH_LAUNCH"  # a file: the test appends the stages of its first launch to it, as JSON


def test_from_nothing_to_sampled_weights_with_data_from_the_hub(hub, boxes, laptop, wheels, base_image, box_user, tmp_path):
    """The whole path for the default recipe. What differs for the others is their card: the corpus they download
    (tests/test_hub.py fetches each hub corpus), their trainer in the box (the --runs test below) and their resume
    (tests/test_promises.py)."""
    recipe = "gpt2"
    spec = contract.HUB_SHARDS[recipes.get(recipe).data]
    data, weights, home = box_path(f"{recipe}-data"), box_path(f"{recipe}-weights"), tmp_path / "model_weights"
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": HUB_TOKEN}
    train = " ".join(TRAIN_ARGS[recipe] + ["--checkpoint-every", "10", "--log-every", "1"])

    def launch(*extra, check=True, runner=fab):
        return runner("launch", *ssh_args(boxes[0], laptop), "--allow-cpu", "--preset", "tiny", "--recipe", recipe, "--data", "hub",
                   "--wheels", wheels, "--build-arg", f"BASE_IMAGE={base_image}", "--data-dir", data, "--weights-dir", weights,
                   "--nproc", 1, "--train-args", train, *extra, env=env, check=check)

    t0 = time.monotonic()
    first = launch("--steps", 100000, "--detach")
    wait_for(lambda: events(weights, "train"), what="the first training step")
    total = time.monotonic() - t0
    # The launch's own timeline (each stage's start and seconds: the data beside the image), and the whole way to the
    # trainer's first step: docs/BENCHMARKS.md takes the figures from here.
    stages = {s["name"]: (round(s["start"], 2), round(s["seconds"], 2)) for s in json.loads((weights / "timeline.json").read_text())["stages"]}
    print(f"fab launch to the first training step, {total:.1f} s; stages (start, seconds): {stages}")
    if os.environ.get(BENCH_ENV):
        with open(os.environ[BENCH_ENV], "a") as f:
            f.write(json.dumps({"recipe": recipe, "to first step": round(total, 2), "stages": stages}) + "\n")
    assert {"preflight", "image", "data", "training"} <= set(stages) and stages["data"][0] < stages["image"][0]  # data began first
    out = first.stdout
    assert f"data: downloading {spec.repo} to {data}/{spec.subdir}" in out and "data: ready in" in out
    assert "with this machine's Hugging Face token" in out
    shards = sorted(p.name for p in (data / spec.subdir).glob("*.bin"))
    assert shards[0] == f"{spec.prefix}_train_000001.bin" and f"{spec.prefix}_val_000000.bin" in shards
    manifest = json.loads((data / spec.subdir / contract.PREPARE_MANIFEST).read_text())
    # Sized to the run, --train-args' batch included (every shard of the small repo).
    batch = int(TRAIN_ARGS[recipe][TRAIN_ARGS[recipe].index("--total-batch-tokens") + 1])
    assert manifest["complete"] and manifest["train_tokens"] == 100000 * batch
    assert {r[2] for r in hub.requests if r[1].endswith(".bin")} == {f"Bearer {HUB_TOKEN}"}
    token_file = Path(pwd.getpwnam(BOX_USER).pw_dir) / ".config/nanogpt/hf-token"
    assert token_file.read_text() == HUB_TOKEN and token_file.stat().st_mode & 0o777 == 0o600

    wait_for(lambda: (weights / contract.CHECKPOINT_FORMAT.format(step=10)).is_file(), what="the first checkpoint")
    fab("fetch-weights", *ssh_args(boxes[0], laptop), "--weights-dir", weights, "--to", home, check=True)
    assert (home / contract.CHECKPOINT_FORMAT.format(step=10)).is_file()
    stop = fab("stop", *ssh_args(boxes[0], laptop), check=True)
    stopped = [e for e in events(weights, "end") if e["reason"] == "stopped"][-1]["step"]
    assert contract.CHECKPOINT_FORMAT.format(step=stopped) in stop.stdout

    gets = len(hub.gets())
    again = launch("--steps", stopped + 5)
    assert "data: shards found" in again.stdout and len(hub.gets()) == gets  # nothing downloaded twice
    assert "resumed from" in again.stdout and f"done: {stopped + 5} steps" in again.stdout, again.stdout[-3000:]
    fab("fetch-weights", *ssh_args(boxes[0], laptop), "--weights-dir", weights, "--to", home, check=True)
    assert (home / contract.CHECKPOINT_FORMAT.format(step=stopped + 5)).is_file()

    sample = run_cli("-m", "job.sample", "--checkpoint", home, "--prompt", "ROMEO:", "--num", "1", "--max-tokens", "8",
                     "--device", "cpu")
    assert sample.returncode == 0 and "ROMEO:" in sample.stdout, sample.stderr
    inspect = sh("docker", "inspect", *sh("docker", "ps", "-aq").stdout.split()).stdout
    for text in (first.stdout, first.stderr, again.stdout, again.stderr, stop.stdout, inspect):
        assert HUB_TOKEN not in text


def test_runs_train_seeds_back_to_back_and_print_the_boards_statistics(boxes, laptop, wheels, base_image, box_user, tmp_path):
    data, weights, home = box_path("runs-data"), box_path("runs-weights"), tmp_path / "model_weights"
    # The current speedrun record's tiny preset narrowed (its three batch stages over 3 steps, one of extension), on the
    # bundled corpus as the box prepares it: one document per paragraph. No samples at the end: on a CPU each of the
    # model's sampled tokens is a forward pass through a bf16 output layer, and the table reads validation only.
    train = ["--n-embd", "32", "--block-size", "128", "--batch-divisor", "1024", "--scheduled-steps", "3", "--extension-steps", "1",
             "--val-seq-len", "64", "--val-tokens", "512", "--log-every", "1", "--sample-num", "0"]
    proc = fab("launch", *ssh_args(boxes[0], laptop), "--allow-cpu", "--recipe", "speedrun", "--preset", "tiny", "--wheels", wheels,
               "--build-arg", f"BASE_IMAGE={base_image}", "--data-dir", data, "--weights-dir", weights, "--nproc", 1, "--steps", 4,
               "--runs", 2, "--fetch-to", home, "--train-args", " ".join(train), check=True)
    out = proc.stdout
    names = [f"seed-{seed}" for seed in (1337, 1338)]  # the trainer's default seed, then the next
    for i, name in enumerate(names, 1):
        assert f"run {i} of 2: seed {1336 + i}, log dir {contract.LOG_DIR}/{name}" in out  # streamed from the box, in turn
        box_run = weights / name
        assert events(box_run, "start")[0]["config"]["seed"] == 1336 + i and events(box_run, "end")[-1]["reason"] == "done"
        assert (box_run / contract.CHECKPOINT_FORMAT.format(step=4)).is_file()
        assert (home / name / contract.METRICS_FILE).read_bytes() == (box_run / contract.METRICS_FILE).read_bytes()
    assert not (weights / contract.METRICS_FILE).exists()  # nothing trained in the weights dir itself
    assert f"fetched the metrics of 2 of 2 runs to {home}" in out
    # The table is job.stats's over the fetched files, and its values are the box's: two runs, each one's last val loss.
    table = stats.format_stats(stats.compute([str(home / n) for n in names]))
    assert table in out and "runs: 2" in table
    for name in names:
        assert f"{events(weights / name, 'val')[-1]['loss']:.4f}" in table.split(name)[1].splitlines()[0]
    assert f"--weights-dir {weights}/seed-S" in out  # where each run's weights are


def test_a_token_the_hub_refuses_is_one_line_and_nothing_starts(hub, boxes, laptop, wheels, base_image, box_user):
    wrong = "hf_aWrongTokenThatMustStaySecret"
    proc = fab("launch", *ssh_args(boxes[0], laptop), "--allow-cpu", "--preset", "tiny", "--data", "hub", "--wheels", wheels,
               "--build-arg", f"BASE_IMAGE={base_image}", "--data-dir", box_path("refused-data"), "--weights-dir",
               box_path("refused-weights"), "--detach", env={"HF_ENDPOINT": hub.url, "HF_TOKEN": wrong})
    line = assert_one_line_error(proc, "data on 127.0.0.1: the Hugging Face hub", "refused the Hugging Face token", "HF_TOKEN")
    assert proc.returncode == 2 and "started" not in proc.stdout and docker_ps() == []
    assert wrong not in proc.stdout + line


# ---- the box's NVIDIA driver picks the image's CUDA flavour; --dry-run ------------------------------------

STAND_IN_SMI = """#!/bin/sh
# Stand-in for NVIDIA's nvidia-smi: one H100 on the driver written in driver.txt beside it ("VERSION CUDA").
read drv cuda < "$(dirname "$0")/driver.txt"
case "$*" in
  *--query-gpu=name,driver_version*) echo "NVIDIA H100 80GB HBM3, $drv" ;;
  *--query-gpu=*) echo "0, 0, 81559" ;;
  *) echo "| NVIDIA-SMI $drv     Driver Version: $drv     CUDA Version: $cuda     |" ;;
esac
"""


@pytest.fixture(scope="module")
def gpu_box(box_user, laptop, tmp_path_factory):
    """A box whose PATH has a stand-in nvidia-smi (and the container toolkit's nvidia-ctk): Docker is real, the GPU is not."""
    bin_dir = box_path("bin")
    (bin_dir / "nvidia-smi").write_text(STAND_IN_SMI)
    (bin_dir / "nvidia-ctk").write_text("#!/bin/sh\nexit 0\n")
    for f in ("nvidia-smi", "nvidia-ctk"):
        (bin_dir / f).chmod(0o755)
    server = start_sshd(tmp_path_factory.mktemp("sshd-gpu"), user=BOX_USER, user_key=laptop / "id_ed25519",
                        extra_config=f"SetEnv PATH={bin_dir}:/usr/local/bin:/usr/bin:/bin\n")
    known = laptop / "known_hosts-gpu"
    known.write_text(server.host_public_key_line + "\n")
    yield server, bin_dir, known
    server.stop()


def set_driver(bin_dir: Path, version: str, cuda: str) -> None:
    (bin_dir / "driver.txt").write_text(f"{version} {cuda}\n")


def box_state(*dirs: Path) -> dict:
    """What a dry run must leave as it was: the files under the box user's home and the run's dirs (names, sizes,
    times), the containers that mount those dirs and the flavoured images in the box's Docker (the engine is shared
    with other test runs, so only what this launch could have made is compared)."""
    files, containers = {}, []
    for d in (Path(pwd.getpwnam(BOX_USER).pw_dir), *dirs):
        for p in sorted(d.rglob("*")) if d.exists() else []:
            st = p.lstat()
            files[str(p)] = (st.st_size, st.st_mtime_ns)
        files[str(d)] = d.exists()
        for sub in (d, d / "data", d / "weights"):
            containers += sh("docker", "ps", "-a", "--filter", f"volume={sub}", "--format", "{{.ID}} {{.State}}").stdout.split()
    images = [line for line in sh("docker", "images", contract.IMAGE_NAME, "--format", "{{.Tag}} {{.ID}}").stdout.splitlines()
              if line.startswith("src-") and "-cu" in line.split()[0]]
    return {"files": files, "containers": sorted(containers), "images": sorted(images)}


@pytest.mark.parametrize("driver, cuda, flavour, base, index", [
    ("580.95.05", "13.0", "cu130", "nvidia/cuda:13.0.1-base-ubuntu24.04@sha256:", "TORCH_INDEX_URL= "),
    ("570.172.08", "12.8", "cu128", "nvidia/cuda:12.8.1-base-ubuntu24.04", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128"),
    ("560.35.03", "12.6", "cu126", "nvidia/cuda:12.6.3-base-ubuntu24.04@sha256:", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126"),
])
def test_dry_run_plans_the_flavour_the_driver_runs_and_changes_nothing(gpu_box, laptop, driver, cuda, flavour, base, index):
    server, bin_dir, known = gpu_box
    set_driver(bin_dir, driver, cuda)
    parent = box_path("dry")
    data, weights = parent / "data", parent / "weights"  # do not exist: a launch would create them, a dry run must not
    before = box_state(parent)
    proc = fab("launch", "--host", server.address, "--key", server.key_path, "--known-hosts", known, "--preset", "tiny",
               "--data-dir", data, "--weights-dir", weights, "--steps", 50, "--dry-run", check=True)
    out = proc.stdout
    assert "1 x NVIDIA H100 80GB HBM3" in out and f"{driver} (CUDA {cuda})" in out  # preflight read the driver
    assert f"image: CUDA flavour {flavour} (CUDA {cuda})" in out
    build = next(line for line in out.splitlines() if " build -f " in line)
    assert f"--build-arg BASE_IMAGE={base}" in build and f"--build-arg {index}" in build  # the flavour's build args
    assert f"-t {contract.IMAGE_NAME}:src-" in build and f"-{flavour} " in build  # the flavour in the tag
    from infra.image import context_digest
    assert f"on the box from this source ({context_digest()[1] / 2**20:.1f} MiB sent)" in out  # what the build sends
    assert f"data: no complete set of shards in {data}/tinyshakespeare: prepared on the box" in out
    assert f"  in the background while the trainer image is built: in the data image {contract.IMAGE_NAME}:src-" in out
    assert f"-{flavour}-data (built first, in a fraction of the trainer image's time; job.prepare without torch)" in out
    assert "container: docker run -d --init" in out and "--gpus all" in out and "--max-steps 50" in out
    assert "cost: not estimated" in out and "nothing was changed on the box" in out
    assert box_state(parent) == before and not data.exists() and not weights.exists()


def test_a_driver_too_old_for_every_flavour_is_refused_before_the_build(gpu_box, laptop):
    server, bin_dir, known = gpu_box
    set_driver(bin_dir, "535.183.01", "12.2")
    parent = box_path("old-driver")
    before = box_state()
    for extra in ([], ["--dry-run"]):
        proc = fab("launch", "--host", server.address, "--key", server.key_path, "--known-hosts", known, "--preset", "tiny",
                   "--data-dir", parent / "data", "--weights-dir", parent / "weights", *extra)
        assert_one_line_error(proc, "driver 535.183.01 (CUDA 12.2)", "driver >= 560.28", "update the driver")
        assert "sending the image source" not in proc.stdout and "started" not in proc.stdout
    assert box_state()["images"] == before["images"] and box_state()["containers"] == before["containers"]
    set_driver(bin_dir, "570.172.08", "12.8")
    proc = fab("launch", "--host", server.address, "--key", server.key_path, "--known-hosts", known, "--cuda", "cu130", "--dry-run",
               "--data-dir", parent / "data", "--weights-dir", parent / "weights")
    assert_one_line_error(proc, "cu130 needs an NVIDIA driver with CUDA >= 13.0", "choose cu128")
    proc = fab("launch", "--host", server.address, "--cuda", "cu99", "--dry-run")
    assert_one_line_error(proc, "no CUDA flavour 'cu99'", "cu128 (CUDA 12.8)")


def test_dry_run_estimates_the_cost_of_a_known_instance_type(gpu_box, laptop):
    """The box's address is one of the account's Lambda instances: its type and price give the estimate."""
    from fake_lambda import H100, TEST_KEY, FakeLambda

    server, bin_dir, known = gpu_box
    set_driver(bin_dir, "580.95.05", "13.0")
    parent = box_path("dry-cost")
    with FakeLambda() as api:
        api.add_instance("train", H100)
        proc = fab("launch", "--host", server.address, "--key", server.key_path, "--known-hosts", known, "--data-dir", parent / "data",
                   "--weights-dir", parent / "weights", "--steps", 1000, "--dry-run",
                   env={"LAMBDA_API_KEY": TEST_KEY, "LAMBDA_API_BASE": api.url}, check=True)
    cost = next(line for line in proc.stdout.splitlines() if line.startswith("cost: "))
    assert f"{H100} x1 in us-east-1: $23.92/hour" in cost and "1000 steps x" in cost and "about $" in cost, cost
    assert "0.25 h setup (assumed)" in cost and "  setup: not measured yet (the first launch measures it)" in proc.stdout
    assert "preparing" not in proc.stdout and not (parent / "data").exists()

    # The timeline a launch of this recipe and preset left in the weights dir prices the setup: 600 s at $23.92/hour
    from infra.timeline import Timeline

    (weights := parent / "weights").mkdir()
    shutil.chown(weights, BOX_USER, BOX_USER)
    tl = Timeline("gpt2", "gpt2", H100)
    tl.add("preflight", 100.0)
    tl.add("data", 500.0)
    (weights / "timeline.json").write_text(tl.to_json())
    with FakeLambda() as api:
        api.add_instance("train", H100)
        proc = fab("launch", "--host", server.address, "--key", server.key_path, "--known-hosts", known, "--data-dir", parent / "data",
                   "--weights-dir", weights, "--steps", 1000, "--dry-run", env={"LAMBDA_API_KEY": TEST_KEY, "LAMBDA_API_BASE": api.url}, check=True)
    lines = proc.stdout.splitlines()
    at = lines.index("  setup: 600 s measured = $3.99 (stages not measured yet are not in it)")  # 1/6 h x $23.92 = $3.987
    assert lines[at + 1:at + 6] == ["    boot: not measured yet", "    preflight: 100 s (measured)", "    image: not measured yet",
                                    "    data: 500 s (measured)", "    fetch: not measured yet"]
    assert lines[at + 6].startswith("  training: 1000 steps x ") and "0.17 h setup (measured)" in lines[at - 1]


def test_dry_run_of_several_runs_plans_and_prices_them_all(gpu_box, laptop, tmp_path):
    from fake_lambda import H100, TEST_KEY, FakeLambda

    server, bin_dir, known = gpu_box
    set_driver(bin_dir, "580.95.05", "13.0")
    parent = box_path("dry-runs")
    with FakeLambda() as api:
        api.add_instance("train", H100)
        proc = fab("launch", "--host", server.address, "--key", server.key_path, "--known-hosts", known, "--data-dir", parent / "data",
                   "--weights-dir", parent / "weights", "--recipe", "speedrun-2025-05-24", "--steps", 1000, "--runs", 3,
                   "--train-args", "--seed 7", "--fetch-to", tmp_path / "home", "--dry-run",
                   env={"LAMBDA_API_KEY": TEST_KEY, "LAMBDA_API_BASE": api.url}, check=True)
    out = proc.stdout
    assert "job.supervisor --runs 3 --preset gpt2 --recipe speedrun-2025-05-24" in out
    runs = next(line.strip() for line in out.splitlines() if line.strip().startswith("runs: "))
    assert runs == (f"runs: 3, one after another, seeds 7, 8, 9, each in {parent / 'weights'}/seed-S with one compile cache; then "
                    f"their metrics.jsonl come to {tmp_path / 'home'} and their statistics are printed (python -m job.stats)")
    cost = next(line for line in out.splitlines() if line.startswith("cost: "))
    assert "3000 steps x" in cost, cost  # the three runs are what is billed
    assert not (parent / "weights").exists() and not (tmp_path / "home").exists()
