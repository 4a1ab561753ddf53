"""Image references for `fab launch --image` and `make push-image` (infra/registry.py, infra/image.py): which tag a
box of each flavour pulls, and what is refused before anything runs. The pulls and pushes themselves run against a
real registry in tests/test_launch.py and tests/test_docker.py."""

from __future__ import annotations

import pytest

from infra.flavour import by_name
from infra.image import pull_ref
from infra.registry import Ref, parse_ref
from job.errors import UserError

DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize("image, flavour, pulled", [
    ("127.0.0.1:5000/team/nanogpt-train", "cu128", "127.0.0.1:5000/team/nanogpt-train:cu128"),  # no tag: the flavour's own
    ("127.0.0.1:5000/team/nanogpt-train:1a2b3c4", "cu126", "127.0.0.1:5000/team/nanogpt-train:1a2b3c4-cu126"),  # a commit's tag
    ("ghcr.io/you/nanogpt-train:1a2b3c4-cu130", "cu130", "ghcr.io/you/nanogpt-train:1a2b3c4-cu130"),  # names this flavour already
    ("ghcr.io/you/nanogpt-train:{flavour}", "cu128", "ghcr.io/you/nanogpt-train:cu128"),
    (f"ghcr.io/you/nanogpt-train@{DIGEST}", "cu128", f"ghcr.io/you/nanogpt-train@{DIGEST}"),  # a digest is one image
])
def test_a_tag_gets_the_flavour_of_the_box_and_a_digest_is_pulled_as_given(image, flavour, pulled):
    assert pull_ref(image, by_name(flavour)) == pulled


def test_a_tag_of_another_flavour_is_one_line_naming_both():
    with pytest.raises(UserError, match=r"is a cu130 image but this run's flavour is cu128 .*adds -cu128\), or pass --cuda cu130"):
        pull_ref("ghcr.io/you/nanogpt-train:1a2b3c4-cu130", by_name("cu128"))


def test_references_are_split_where_docker_splits_them():
    assert parse_ref("127.0.0.1:5000/team/n") == Ref("127.0.0.1:5000/team/n")  # the port's colon is not a tag
    assert parse_ref("127.0.0.1:5000/team/n:t") == Ref("127.0.0.1:5000/team/n", "t")
    assert parse_ref(f"reg.example/n:t@{DIGEST}") == Ref("reg.example/n", "t", DIGEST)
    assert parse_ref(f"reg.example/n:t@{DIGEST}").pinned == f"reg.example/n@{DIGEST}"


@pytest.mark.parametrize("bad, says", [
    ("http://reg.example/n", "not an image reference"),
    ("Reg.example/Team/N", "not an image reference"),
    ("reg.example/n@sha256:abc", "64 hex digits"),
    ("reg.example/n:", "not an image reference"),
])
def test_a_reference_docker_would_refuse_is_refused_first(bad, says):
    with pytest.raises(UserError, match=says):
        parse_ref(bad)
