"""Which CUDA build of the pinned torch the box's NVIDIA driver runs: the image is built (or pulled) for it.

A driver runs a CUDA runtime up to the "CUDA Version" nvidia-smi prints in its header (the CUDA minor-version
compatibility rule: same major, driver >= the runtime's major.minor); the container runtime refuses an image whose
NVIDIA_REQUIRE_CUDA asks for more, and only when `docker run` starts it. Clouds move their driver with their
image releases, so the launcher reads it and picks the newest flavour that fits, before anything is built.

FLAVOURS is the one table of what exists: the CUDA builds PyTorch publishes for the pinned torch on its own wheel
index (download.pytorch.org/whl/<name>), each on the NVIDIA CUDA *base* image of the same CUDA version. Re-check
it when bumping torch (requirements.txt), and the base digests with `docker buildx imagetools inspect`.

    python -m infra.flavour cu128          # the `docker build` flags for one flavour (make build-image CUDA=cu128)
    python -m infra.flavour --name 12.8    # its name: cu128
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from job.errors import UserError

if TYPE_CHECKING:
    from infra.box import Box

INDEX = "https://download.pytorch.org/whl/"


@dataclass(frozen=True)
class Flavour:
    name: str  # PyTorch's name for the build and the image tag's suffix: cu128
    cuda: tuple[int, int]  # the CUDA runtime inside; the driver's "CUDA Version" must be at least this
    base_image: str  # NVIDIA's CUDA base image of that version (Ubuntu 24.04: Python 3.12)
    min_driver: str  # the Linux driver of that CUDA release, for the message when a box's driver is older
    pypi_default: bool = False  # torch's PyPI wheels are this build: nothing to add to pip

    @property
    def cuda_text(self) -> str:
        return f"{self.cuda[0]}.{self.cuda[1]}"

    @property
    def index_url(self) -> str:
        return "" if self.pypi_default else INDEX + self.name

    def build_args(self) -> dict[str, str]:
        """docker/Dockerfile's build args for this flavour; a --build-arg given by hand wins over them."""
        return {"BASE_IMAGE": self.base_image, "TORCH_INDEX_URL": self.index_url}


# Newest first. torch 2.13.0: PyPI's default wheels are the CUDA 13.0 build; PyTorch's index also has 12.8 and 12.6.
FLAVOURS = (
    Flavour("cu130", (13, 0), "nvidia/cuda:13.0.1-base-ubuntu24.04@sha256:f8ef28f579ea42a44b415d2c5d46f788e6a9b395c6c83f2929416e1fc192c143",
            "580.65", pypi_default=True),
    Flavour("cu128", (12, 8), "nvidia/cuda:12.8.1-base-ubuntu24.04", "570.26"),
    Flavour("cu126", (12, 6), "nvidia/cuda:12.6.3-base-ubuntu24.04@sha256:c87e78933f4c16e3272123bf2f75537306596d0fbaa395a29696a22786e5ee0e",
            "560.28"),
)
DEFAULT = FLAVOURS[0]  # a box without a GPU (--allow-cpu) and `make build-image` without CUDA=
CUDA_VERSION = re.compile(r"CUDA Version:\s*(\d+)\.(\d+)")


def parse_cuda_version(nvidia_smi: str) -> tuple[int, int] | None:
    """The driver's highest CUDA version from nvidia-smi's header ("| ... CUDA Version: 12.8 |")."""
    m = CUDA_VERSION.search(nvidia_smi)
    return (int(m.group(1)), int(m.group(2))) if m else None


def by_name(name: str) -> Flavour:
    """cu128, or the CUDA version 12.8: one of FLAVOURS."""
    for f in FLAVOURS:
        if name in (f.name, f.cuda_text):
            return f
    raise UserError(f"no CUDA flavour {name!r} of the pinned torch: choose one of "
                    f"{', '.join(f'{f.name} (CUDA {f.cuda_text})' for f in FLAVOURS)}")


def choose(driver_cuda: tuple[int, int] | None, *, host: str, driver: str | None = None, wanted: str | None = None) -> Flavour:
    """The newest flavour this driver runs (or `wanted`, if it runs that); DEFAULT without a GPU."""
    fits = [f for f in FLAVOURS if driver_cuda is None or f.cuda <= driver_cuda]
    if wanted:
        chosen = by_name(wanted)
        if chosen in fits:
            return chosen
        raise UserError(f"{chosen.name} needs an NVIDIA driver with CUDA >= {chosen.cuda_text} (>= {chosen.min_driver}) but "
                        f"{host} has {_driver(driver, driver_cuda)}: choose {fits[0].name if fits else 'another box'}, or leave --cuda out")
    if fits:
        return fits[0]
    oldest = FLAVOURS[-1]
    raise UserError(f"the NVIDIA driver on {host} is too old for the pinned torch: it has {_driver(driver, driver_cuda)}, the oldest "
                    f"CUDA build ({oldest.name}) needs CUDA >= {oldest.cuda_text}, i.e. driver >= {oldest.min_driver}: update the "
                    "driver there (on a cloud: an instance with a newer image) or use another box")


def _driver(driver: str | None, cuda: tuple[int, int] | None) -> str:
    cuda_text = f"CUDA {cuda[0]}.{cuda[1]}" if cuda else "CUDA unknown"
    return f"driver {driver} ({cuda_text})" if driver else cuda_text


def common(flavours: list[Flavour]) -> Flavour:
    """One flavour for all nodes of a run (the same NCCL and CUDA everywhere): the oldest chosen."""
    return min(flavours, key=lambda f: f.cuda)


def choose_flavour(boxes: list[Box], wanted: str | None) -> Flavour:
    """The CUDA flavour for this run: the newest each box's driver runs, the oldest of those across nodes; one line naming
    the driver needed when a box has none that fits (before anything is built, pulled or started)."""
    return common([choose(b.cuda, host=b.host, driver=b.driver, wanted=wanted) for b in boxes])


def docker_flags(name: str) -> str:
    return " ".join(f"--build-arg {k}={v}" for k, v in by_name(name).build_args().items())


def main(argv: list[str]) -> None:
    """`python -m infra.flavour [--name] [CUDA]`: the build flags (or, with --name, the name) of a flavour."""
    name_only = argv[:1] == ["--name"]
    wanted = (argv[1:] if name_only else argv) or [DEFAULT.name]
    print(by_name(wanted[0]).name if name_only else docker_flags(wanted[0]))


if __name__ == "__main__":
    from job.errors import cli_main

    cli_main(main)(sys.argv[1:])
