"""The options of `fab launch`, each defined once as a field (infra/flags.py): the SSH connection, Lambda Cloud and the
launch's own. What to train is the Job's (infra/container.py), whose fields are flags too."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from infra.container import Job
from infra.flags import checked, decimal, host_list, integer, nested, option, optional, pairs
from infra.ssh import connect
from job.errors import UserError, check_output_path


def _base_url(text: str) -> None:
    from job.sidecar.lambda_cloud import check_base_url

    check_base_url(text)


def _endpoint(text: str) -> None:
    from job.sidecar.s3 import check_endpoint

    check_endpoint(text)


def _image(text: str) -> None:
    from infra.registry import check_image_flag

    check_image_flag(text)


def _wheels(text: str) -> None:
    d = Path(text).expanduser()
    if not d.is_dir():
        raise UserError(f"--wheels {text} is not a directory: pass a local directory of .whl files (pip download -d DIR ...)")
    if not any(d.glob("*.whl")):
        raise UserError(f"--wheels {text} holds no .whl files: pass the directory that pip download -d wrote them to")


def _flavour(text: str) -> None:
    from infra.flavour import by_name

    by_name(text)


# --- the options ----------------------------------------------------------------------------------------------
@dataclass
class SSHOptions:
    key: str | None = option(None, "SSH private key (default: agent / ~/.ssh)")
    port: int | None = option(None, "SSH port (default 22)", parse=integer(1, 65535))
    known_hosts: str | None = option(None, "known_hosts file (default ~/.ssh/known_hosts)")
    accept_new_host_key: bool = option(False, "trust a box seen for the first time and remember its key (like OpenSSH accept-new)")

    def connect(self, host: str, opened=None):
        if not host:
            raise UserError("no box given: pass --host ubuntu@IP")
        return connect(host, port=self.port, key=self.key, known_hosts=self.known_hosts, accept_new_host_key=self.accept_new_host_key,
                       opened=opened)


@dataclass
class CloudOptions:
    """Lambda Cloud: provision the box first, and/or guard its cost from the box itself (job/sidecar/guard.py)."""

    provision: bool = option(False, "create the box on Lambda Cloud first (with --type, --ssh-key; shows the price and asks)")
    type_name: str = option("", "--provision: instance type, e.g. gpu_8x_h100_sxm5 (fab types)", flag="type")
    region: str = option("auto", "--provision: region, or auto (one with capacity now)")
    ssh_key: str = option("", "--provision: the name of your SSH key in Lambda Cloud")
    name: str | None = option(None, "--provision: instance name")
    ssh_user: str = option("ubuntu", "--provision: login user on the new box (default ubuntu)")
    yes: bool = option(False, "--provision: do not ask before launching the instance")
    terminate_when_done: bool = option(False, "terminate the instance once training ends and the final checkpoint is in S3 or on "
                                              "this disk")
    max_hours: float | None = option(None, "stop training with a checkpoint after H hours, then terminate (needs the final "
                                           "checkpoint safe, as above)", parse=optional(decimal(0, above=0)))
    api_key_file: str | None = option(None, "Lambda API key file, mode 600 (default ~/.config/lambda/api_key; LAMBDA_API_KEY wins)")
    api_base: str | None = option(None, "Lambda API base URL (default https://cloud.lambdalabs.com/api/v1, or LAMBDA_API_BASE)",
                                  parse=checked(_base_url))
    guard_poll_seconds: float = option(30.0, "seconds between the cost guard's looks at the run (default 30)",
                                       parse=decimal(0.1), flag="guard_poll")
    step_seconds: float | None = option(None, "--provision: seconds per step for the cost estimate (default: measured or assumed "
                                              "per GPU type)", parse=optional(decimal(0, above=0)))

    def __post_init__(self):
        if self.api_base is None and os.environ.get("LAMBDA_API_BASE"):
            self.api_base = os.environ["LAMBDA_API_BASE"]
            _base_url(self.api_base)  # a typo fails now, not when the cost guard first calls the API
        if self.guarded:
            from job.sidecar.guard import check_settings

            check_settings(self.terminate_when_done, self.max_hours)  # what the guard on the box would refuse

    @property
    def guarded(self) -> bool:
        return self.terminate_when_done or self.max_hours is not None


@dataclass
class LaunchOptions:
    host: str = option("", "the box, e.g. ubuntu@203.0.113.7")
    hosts: list[str] = option(None, "several boxes for one multi-node run: ubuntu@A,ubuntu@B (the first is node 0 and holds the "
                                    "checkpoints)", parse=host_list, factory=list)
    ssh: SSHOptions = nested(SSHOptions)
    job: Job = nested(Job)
    image: str | None = option(None, "REGISTRY/NAME[:TAG] or REGISTRY/NAME@sha256:DIGEST to docker pull on the box, by digest (a tag gets "
                                     "the box's flavour: TAG-cu128); a failed pull builds there instead (default: build from this source)",
                               parse=checked(_image))
    ship: bool = option(False, "docker save the local image and load it on the box (small or offline boxes)")
    build_args: dict[str, str] = option(None, "extra docker build args for the build on the box, e.g. 'BASE_IMAGE=...'", parse=pairs,
                                        factory=dict, flag="build_arg")
    wheels: str | None = option(None, "a local directory of .whl files to install in the image built on the box", parse=checked(_wheels))
    fs: str | None = option(None, "name of the Lambda persistent filesystem to keep data on (mounted at /persistent)")
    data_dir: str | None = option(None, "a directory on the box instead of --fs (default ~/nanogpt-data)")
    weights_dir: str = option("~/model_weights", "the box's dir for checkpoints and logs, mounted at /app/log (default ~/model_weights)")
    allow_cpu: bool = option(False, "train on the CPUs when the box has no GPU")
    detach: bool = option(False, "start and return, without streaming the log")
    restart: bool = option(False, "stop the active run (with a checkpoint) and start again")
    sync_s3: str | None = option(None, "s3://BUCKET/PREFIX: a sidecar on the box uploads each checkpoint as soon as it is saved")
    s3_endpoint: str | None = option(None, "S3-compatible endpoint URL for --sync-s3 (default: AWS)", parse=checked(_endpoint))
    master_addr: str | None = option(None, "multi-node: the first host's address as the others reach it (default: as given in --hosts)")
    master_port: int = option(29500, "multi-node: rendezvous port on the first host (default 29500)", parse=integer(1, 65535))
    cloud: CloudOptions = nested(CloudOptions)
    fetch_to: str = option("model_weights", "--terminate-when-done without --sync-s3: where the weights come before terminating; "
                                            "--runs: where the runs' metrics come (default ./model_weights)")
    cuda: str | None = option(None, "CUDA flavour of torch for the image: cu130, cu128, cu126 (default: the newest the box's driver "
                                    "runs)", parse=checked(_flavour))
    dry_run: bool = option(False, "connect, check the box and print the plan (image, data, container, cost); change nothing")

    def __post_init__(self):
        if self.host and self.hosts:
            raise UserError("give --host for one box or --hosts A,B for several, not both")
        if self.host:
            self.hosts = [self.host]
        if self.job.runs:
            self.check_runs()

    def check_runs(self) -> None:
        """--runs trains on one box, in sub-directories of the weights dir, one run after another: what watches the
        weights dir itself (the S3 sidecar, the cost guard) would not see them."""
        where = "--runs trains in sub-directories of the weights dir (seed-S)"
        if len(self.hosts) > 1:
            raise UserError("--runs trains on one box: pass --host, not --hosts")
        if self.sync_s3:
            raise UserError(f"{where}, which the S3 sidecar does not upload: leave out --sync-s3, or --runs")
        if self.cloud.guarded:
            raise UserError(f"{where}, which the cost guard does not watch: leave out --terminate-when-done and --max-hours, "
                            "or --runs")
        if not self.detach:
            check_output_path(self.fetch_to, "--fetch-to", directory=True)  # where the runs' metrics come, before any connection


