#!/usr/bin/env python
"""Estimate the size of the CUDA trainer image from PyPI's wheel sizes and the CPU test image.

The CUDA image cannot be built here (no registry reaches NVIDIA's base image, and the CUDA torch wheels are
GBs), so we add up: the CPU test image minus its base and its CPU torch (= system packages + the other
Python deps, measured), the installed size of the CUDA torch wheel and of every CUDA wheel it pins (read
from each wheel's zip directory on PyPI with HTTP range requests: no wheel is downloaded), and the
published size of the CUDA base image (an assumption, stated in the output).

    python scripts/estimate_cuda_image.py --image nanogpt-train-test:latest
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job.errors import ArgumentParser, UserError, cli_main  # noqa: E402

SIMPLE = "https://pypi.org/simple/{}/"
PY = "cp312"  # Ubuntu 24.04's Python, what the CUDA image runs
CUDA_BASE_MB = 240  # nvidia/cuda:13.0.1-base-ubuntu24.04 unpacked, roughly (assumption: not pullable here)


def files(project: str) -> list[dict]:
    req = urllib.request.Request(SIMPLE.format(project), headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["files"]


def linux_wheel(project: str, version: str) -> dict:
    norm = project.replace("-", "_")
    version = version.rstrip("*").rstrip(".")  # "13.0.85.*" pins a release series
    pattern = re.compile(rf"{re.escape(norm)}-{re.escape(version)}(\.\d+)*-.*\.whl$")
    candidates = [f for f in files(project) if pattern.match(f["filename"])]
    for f in sorted(candidates, key=lambda f: "none-any" in f["filename"]):  # platform wheels first, pure ones as fallback
        name = f["filename"]
        if ("x86_64" in name and "linux" in name and (PY in name or "py3-none" in name or "abi3" in name)) or "none-any" in name:
            return f
    raise UserError(f"PyPI has no linux x86_64 wheel for {project}=={version}: pass a released version to --torch, e.g. 2.13.0")


class RangeFile(io.RawIOBase):
    """Enough of a seekable file over HTTP range requests for zipfile to read a wheel's directory."""

    def __init__(self, url: str, size: int):
        self.url, self.size, self.pos = url, size, 0

    def seekable(self):
        return True

    def readable(self):
        return True

    def seek(self, offset, whence=0):
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def read(self, n=-1):
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end - 1}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            data = r.read()
        self.pos += len(data)
        return data


def installed_size(wheel: dict) -> int:
    with zipfile.ZipFile(RangeFile(wheel["url"], wheel["size"])) as z:
        return sum(i.file_size for i in z.infolist())


def requires(wheel: dict, extras: set[str] = frozenset()) -> list[tuple[str, str, set[str]]]:
    """Pinned Linux requirements (name, version, extras) of a wheel, including those of the given extras."""
    try:
        with urllib.request.urlopen(wheel["url"] + ".metadata", timeout=60) as r:
            meta = r.read().decode()
    except urllib.error.HTTPError:  # older uploads have no separate metadata file: read it from the zip
        with zipfile.ZipFile(RangeFile(wheel["url"], wheel["size"])) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    out = []
    for line in meta.splitlines():
        m = re.match(r"Requires-Dist: ([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*\(?(==|>=)\s*([^;,\s)]+)[^;]*(;.*)?$", line)
        if not m:
            continue
        name, want, op, ver, marker = m.group(1), m.group(2), m.group(3), m.group(4), m.group(5) or ""
        if "Windows" in marker or ("platform_machine" in marker and "x86_64" not in marker):
            continue
        extra = re.search(r"""extra == ["']([^"']+)["']""", marker)
        if (extra and extra.group(1) not in extras) or (not extra and extras and op != "=="):
            continue
        if name.startswith(("nvidia", "triton", "cuda")):
            out.append((name, ver, set(want.strip("[]").split(",")) if want else set()))
    return out


def closure(name: str, version: str, extras: set[str] = frozenset(), seen=None) -> list[tuple[str, str, dict]]:
    seen = {} if seen is None else seen
    if (name, version) in seen:
        return []
    wheel = linux_wheel(name, version)
    seen[(name, version)] = wheel
    rows = [(name, version, wheel)]
    for dep, ver, dep_extras in requires(wheel, extras):
        rows += closure(dep, ver, dep_extras, seen)
    return rows


def docker(*args) -> str:
    try:
        return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise UserError("the docker CLI is not installed here: this estimate reads the local test images") from None
    except subprocess.CalledProcessError as e:
        said = " ".join(e.stderr.split())[:200]
        raise UserError(f"`docker {' '.join(args[:2])}` failed ({said}): build the images first (--image, --base name them)") from None


def release(text: str) -> str:
    """A release's version number (2.13.0), refused before PyPI is asked."""
    if not re.fullmatch(r"\d+(\.\d+)*", text):
        raise argparse.ArgumentTypeError(f"takes a release's version number, e.g. 2.13.0, got {text!r}")
    return text


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default="nanogpt-train-test:latest", help="the CPU test build of docker/Dockerfile")
    p.add_argument("--base", default="nanogpt-test-base:bookworm", help="the test base it was built on")
    p.add_argument("--torch", type=release, default="2.13.0", help="the torch release whose CUDA wheels are sized (PyPI)")
    args = p.parse_args(argv)

    mb = 2**20
    image_mb = int(docker("image", "inspect", "-f", "{{.Size}}", args.image)) / mb
    base_mb = int(docker("image", "inspect", "-f", "{{.Size}}", args.base)) / mb
    torch_cpu_installed = int(docker("run", "--rm", "--entrypoint", "du", args.image, "-sb",
                                     "/opt/venv/lib/python3.11/site-packages/torch").split()[0]) / mb
    rest_mb = image_mb - base_mb - torch_cpu_installed  # apt packages + the other Python deps

    rows = [(n, v, w["size"] / mb, installed_size(w) / mb) for n, v, w in closure("torch", args.torch)]
    wheels_mb, cuda_mb = sum(r[2] for r in rows), sum(r[3] for r in rows)
    total = CUDA_BASE_MB + rest_mb + cuda_mb
    print(f"CPU test image {args.image}: {image_mb:,.0f} MiB (test base {base_mb:,.0f}, CPU torch installed {torch_cpu_installed:,.0f}, "
          f"everything else {rest_mb:,.0f})")
    for name, ver, size, inst in rows:
        print(f"  {name}=={ver}: {size:,.0f} MiB wheel, {inst:,.0f} MiB installed")
    print(f"CUDA torch and its CUDA wheels: {wheels_mb:,.0f} MiB to download, {cuda_mb:,.0f} MiB installed")
    print(f"estimated CUDA image: {CUDA_BASE_MB} (CUDA base, assumed) + {rest_mb:,.0f} + {cuda_mb:,.0f} = ~{total / 1024:.1f} GiB")


if __name__ == "__main__":
    main()
