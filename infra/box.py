"""Preflight: what the box has (GPUs, driver, Docker, NVIDIA container runtime, disk, storage) before anything runs.

Every check reads the box through plain shell commands over the Connection and fails with one line that says
what to do. Nothing here changes the box except creating the data and weights directories the run needs.
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass, field

from infra.ssh import run
from job.errors import UserError

# Where Lambda mounts a persistent filesystem named NAME: /lambda/nfs/NAME on current images, ~/NAME
# (/home/ubuntu/NAME) on older ones. Anything else mounted with that last path component is accepted too.
FS_CANDIDATES = ("/lambda/nfs/{name}", "~/{name}")
LOW_DISK_GB = 30  # FineWeb-edu 10B shards are ~20 GB and a 124M checkpoint with optimizer ~1.5 GB


@dataclass
class Box:
    host: str
    user: str
    uid: int
    gid: int
    docker: str  # the command that reaches the Docker daemon: "docker", or "sudo -n docker" without the group
    gpus: list[str] = field(default_factory=list)
    driver: str | None = None
    cuda: tuple[int, int] | None = None  # the highest CUDA version the driver runs (nvidia-smi's header)
    nvidia_runtime: bool = False
    cpus: int = 0
    data_dir: str = ""  # absolute, on the box; mounted at contract.PERSISTENT
    weights_dir: str = ""  # absolute, on the box; mounted at contract.LOG_DIR
    free_gb: float = 0.0
    persistent: bool = False  # data_dir is on a persistent filesystem (survives terminating the instance)

    @property
    def use_gpus(self) -> bool:
        return bool(self.gpus)


def sh(conn, cmd: str, warn: bool = True):
    return run(conn, cmd, warn=warn)


def find_docker(conn) -> str:
    if sh(conn, "command -v docker").failed:
        raise UserError(f"docker is not installed on {conn.host}: install Docker Engine there (https://docs.docker.com/engine/install/) "
                        "or use an image that has it (Lambda's does)")
    if sh(conn, "docker info --format '{{.ServerVersion}}'").ok:
        return "docker"
    if sh(conn, "sudo -n docker info --format '{{.ServerVersion}}'").ok:
        return "sudo -n docker"
    daemon_down = "Cannot connect" in sh(conn, "docker info 2>&1").stdout
    if daemon_down:
        raise UserError(f"the Docker daemon is not running on {conn.host}: start it there with `sudo systemctl start docker`")
    raise UserError(f"user {conn.user} on {conn.host} may not use Docker: run `sudo usermod -aG docker {conn.user}` there and launch again")


def find_gpus(conn) -> tuple[list[str], str | None]:
    res = sh(conn, "nvidia-smi --query-gpu=name,driver_version --format=csv,noheader")
    if res.failed:
        return [], None
    rows = [[c.strip() for c in line.split(",")] for line in res.stdout.splitlines() if line.strip()]
    return [r[0] for r in rows], (rows[0][1] if rows and len(rows[0]) > 1 else None)


def driver_cuda(conn) -> tuple[int, int] | None:
    """The driver's highest CUDA version, from nvidia-smi's header: what decides the image's CUDA flavour."""
    from infra.flavour import parse_cuda_version

    return parse_cuda_version(sh(conn, "nvidia-smi").stdout)


def has_nvidia_runtime(conn, docker: str) -> bool:
    """`--gpus all` needs the NVIDIA container toolkit: a runtime registered with Docker, or its CLI hook."""
    runtimes = sh(conn, f"{docker} info --format '{{{{json .Runtimes}}}}'").stdout
    return "nvidia" in runtimes or sh(conn, "command -v nvidia-container-cli || command -v nvidia-ctk").ok


def resolve_dir(conn, path: str) -> str:
    """Absolute path on the box: ~ is the box user's home, and a relative path is taken from there, as ssh does."""
    if path == "~" or path.startswith("~/") or not path.startswith("/"):
        home = sh(conn, 'printf %s "$HOME"', warn=False).stdout
        path = home + "/" + path.lstrip("~").lstrip("/")
    return posixpath.normpath(path)


def find_fs(conn, name: str) -> str:
    if not name or "/" in name:
        raise UserError(f"--fs takes the persistent filesystem's name as Lambda shows it (e.g. my-fs), got {name!r}; use --data-dir for a path")
    for pattern in FS_CANDIDATES:
        path = resolve_dir(conn, pattern.format(name=name))
        if sh(conn, f"test -d {shlex.quote(path)}").ok:
            return path
    mounts = sh(conn, "findmnt -rn -o TARGET").stdout.split()
    found = [m for m in mounts if m.rstrip("/").rsplit("/", 1)[-1] == name]
    if found:
        return found[0]
    raise UserError(f"no persistent filesystem named {name!r} on {conn.host} (looked in /lambda/nfs/{name}, ~/{name} and the mounts): "
                    "attach it when launching the instance, or pass --data-dir")


def ensure_writable(conn, path: str, what: str, flag: str, create: bool = True) -> None:
    """mkdir -p and a probe file; with create=False (a dry run) only look: the dir, or the nearest existing parent
    that mkdir would create it in, is writable."""
    q = shlex.quote(path)
    probe = shlex.quote(f"{path}/.nanogpt-write-test")
    check = f"mkdir -p {q} && touch {probe} && rm -f {probe}"
    if not create:
        check = f"p={q}; while [ ! -e \"$p\" ]; do p=$(dirname \"$p\"); done; test -d \"$p\" -a -w \"$p\""
    if sh(conn, check).failed:
        raise UserError(f"{what} {path} on {conn.host} is not writable by {conn.user}: `sudo chown {conn.user} {path}` there, or pass another {flag}")


def free_gb(conn, path: str) -> float:
    """Free space where `path` is (or would be: its nearest existing parent)."""
    look = f"p={shlex.quote(path)}; while [ ! -e \"$p\" ]; do p=$(dirname \"$p\"); done; df -Pk \"$p\" | tail -1"
    out = sh(conn, look).stdout.split()
    return int(out[3]) / 2**20 if len(out) > 3 and out[3].isdigit() else 0.0


def is_persistent(conn, path: str) -> bool:
    fstype = sh(conn, f"findmnt -rn -o FSTYPE -T {shlex.quote(path)}").stdout.strip()
    return fstype.startswith(("nfs", "virtiofs", "fuse", "lustre", "ceph"))


def preflight(conn, *, fs: str | None = None, data_dir: str | None = None, weights_dir: str = "~/model_weights",
              allow_cpu: bool = False, create: bool = True) -> Box:
    """Read the box; create=False (`fab launch --dry-run`) changes nothing there, not even the data and weights dirs."""
    if fs and data_dir:
        raise UserError("give either --fs NAME (a Lambda persistent filesystem) or --data-dir PATH, not both")
    docker = find_docker(conn)
    gpus, driver = find_gpus(conn)
    if not gpus and not allow_cpu:
        raise UserError(f"no NVIDIA GPU found on {conn.host} (nvidia-smi lists none): is this a GPU instance? "
                        "Pass --allow-cpu to train on its CPUs anyway")
    runtime = has_nvidia_runtime(conn, docker)
    if gpus and not runtime:
        raise UserError(f"{conn.host} has GPUs but Docker cannot use them: install the NVIDIA Container Toolkit there "
                        "(https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/) and restart Docker")
    ids = sh(conn, "id -u; id -g; nproc", warn=False).stdout.split()
    data = find_fs(conn, fs) if fs else resolve_dir(conn, data_dir or "~/nanogpt-data")
    weights = resolve_dir(conn, weights_dir)
    ensure_writable(conn, data, "data dir", "--data-dir or --fs", create)
    ensure_writable(conn, weights, "weights dir", "--weights-dir", create)
    return Box(host=conn.host, user=conn.user, uid=int(ids[0]), gid=int(ids[1]), cpus=int(ids[2]), docker=docker, gpus=gpus,
               driver=driver, cuda=driver_cuda(conn) if gpus else None, nvidia_runtime=runtime, data_dir=data, weights_dir=weights,
               free_gb=free_gb(conn, data), persistent=bool(fs) or is_persistent(conn, data))


def table(boxes: list[Box]) -> str:
    rows = [("host", "GPUs", "driver", "docker", "NVIDIA runtime", "CPUs", "data dir (free)", "weights dir")]
    for b in boxes:
        gpus = f"{len(b.gpus)} x {b.gpus[0]}" if b.gpus else "none (CPU)"
        driver = f"{b.driver or '?'} (CUDA {b.cuda[0]}.{b.cuda[1]})" if b.cuda else b.driver or "-"
        rows.append((b.host, gpus, driver, b.docker, "yes" if b.nvidia_runtime else "no", str(b.cpus),
                     f"{b.data_dir} ({b.free_gb:.0f} GB free{'' if b.persistent else ', local disk'})", b.weights_dir))
    notes = []
    for b in boxes:
        if b.free_gb < LOW_DISK_GB:
            notes.append(f"warning: only {b.free_gb:.0f} GB free for data on {b.host} (FineWeb-edu 10B needs ~20 GB, checkpoints 1.5 GB each)")
        if not b.persistent:
            notes.append(f"note: {b.data_dir} on {b.host} is the instance's own disk, lost when the instance is terminated (--fs NAME keeps it)")
    return "\n".join([format_table(rows), *notes])


def format_table(rows: list) -> str:
    """Plain aligned columns; the first row is the header."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
