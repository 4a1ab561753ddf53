"""The CUDA flavour of the image: what the box's driver runs, read from nvidia-smi's header (infra/flavour.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_line_error
from infra.flavour import DEFAULT, FLAVOURS, by_name, choose, common, parse_cuda_version
from job.errors import UserError

# nvidia-smi's header as drivers print it (the table's second line), and what is parsed from it.
HEADERS = [
    ("| NVIDIA-SMI 580.95.05              Driver Version: 580.95.05      CUDA Version: 13.0     |", (13, 0)),
    ("| NVIDIA-SMI 570.172.08             Driver Version: 570.172.08     CUDA Version: 12.8     |", (12, 8)),
    ("| NVIDIA-SMI 560.35.03              Driver Version: 560.35.03      CUDA Version: 12.6     |", (12, 6)),
    ("| NVIDIA-SMI 535.183.01             Driver Version: 535.183.01     CUDA Version: 12.2     |", (12, 2)),
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", None),
]


@pytest.mark.parametrize("header, cuda", HEADERS)
def test_the_drivers_cuda_version_is_read_from_the_header(header, cuda):
    assert parse_cuda_version("Mon Nov 30 12:00:00 2026\n+----+\n" + header + "\n|----|\n") == cuda


@pytest.mark.parametrize("cuda, name", [((13, 2), "cu130"), ((13, 0), "cu130"), ((12, 9), "cu128"), ((12, 8), "cu128"),
                                        ((12, 7), "cu126"), ((12, 6), "cu126")])
def test_the_newest_flavour_the_driver_runs_is_chosen(cuda, name):
    chosen = choose(cuda, host="box")
    assert chosen.name == name and chosen.cuda <= cuda


def test_no_gpu_gets_the_default_and_a_too_old_driver_one_line_naming_the_driver_needed():
    assert choose(None, host="box") is DEFAULT
    with pytest.raises(UserError, match=r"driver 535\.183\.01 \(CUDA 12\.2\), the oldest CUDA build \(cu126\) needs CUDA >= 12\.6, "
                                        r"i\.e\. driver >= 560\.28: update the driver"):
        choose((12, 2), host="box", driver="535.183.01")


def test_a_flavour_asked_for_must_exist_and_fit_the_driver():
    assert choose((13, 0), host="box", wanted="cu126").name == "cu126" and by_name("12.8").name == "cu128"
    with pytest.raises(UserError, match="cu130 needs an NVIDIA driver with CUDA >= 13.0 .* choose cu128"):
        choose((12, 8), host="box", wanted="cu130")
    with pytest.raises(UserError, match="no CUDA flavour 'cu118'"):
        by_name("cu118")


def test_nodes_of_one_run_share_the_oldest_flavour_chosen():
    assert common([by_name("cu130"), by_name("cu126"), by_name("cu128")]).name == "cu126"


def test_each_flavour_names_its_base_and_wheel_index():
    for f in FLAVOURS:
        assert f.base_image.startswith(f"nvidia/cuda:{f.cuda_text}.") and "-base-ubuntu24.04" in f.base_image
        assert f.build_args()["TORCH_INDEX_URL"] == ("" if f.pypi_default else f"https://download.pytorch.org/whl/{f.name}")
    assert [f.cuda for f in FLAVOURS] == sorted((f.cuda for f in FLAVOURS), reverse=True)  # newest first: choose relies on it
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE={DEFAULT.base_image}\n" in dockerfile  # a plain `docker build` gets the default flavour too


def test_make_build_image_takes_a_flavour_and_refuses_an_unknown_one_in_one_line():
    make = ["make", "--no-print-directory", "-C", str(ROOT), "build-image", "DOCKER=echo", "NAME=nanogpt-train-flavour-test"]
    proc = subprocess.run([*make, "CUDA=12.8"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04" in proc.stdout
    assert "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128" in proc.stdout
    assert "-t nanogpt-train-flavour-test:cu128" in proc.stdout
    bad = subprocess.run([*make, "CUDA=11.8"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and bad.stderr.splitlines()[0].startswith("error: no CUDA flavour '11.8'"), bad.stderr
    cli = subprocess.run([sys.executable, "-m", "infra.flavour", "cu99"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert_one_line_error(cli, "no CUDA flavour 'cu99'")
    assert cli.returncode == 2
