"""The launcher's secrets: found on this machine, written to the box as 0600 files under the user's home (on the SSH
channel's stdin, never on a command line or in a log), and mounted read-only into the one container that needs each.

- AWS credentials (the usual chain): the S3 sidecar and the cost guard (--sync-s3).
- the Hugging Face token (HF_TOKEN or huggingface_hub's token file): the data download only; without one it is
  anonymous.
- the Lambda API key: the cost guard only (its path here; infra/launch.py sends it).
- the W&B API key (WANDB_API_KEY or ~/.netrc): the trainer, for --wandb.
"""

from __future__ import annotations

import io
import netrc
import os
import shlex
import sys

from infra.ssh import run, stream
from job import contract
from job.errors import UserError
from job.hub_token import hf_token

# On the box, relative to the user's home; each 0600.
CREDENTIALS = ".config/nanogpt/aws-credentials"
HF_TOKEN_FILE = ".config/nanogpt/hf-token"  # for the data download only
LAMBDA_KEY = ".config/nanogpt/lambda-api-key"  # for the cost guard only
WANDB_KEY = ".config/nanogpt/wandb-api-key"
WANDB_HOST = "api.wandb.ai"


def send_secret(conn, relpath: str, body: bytes) -> str:
    """Write a secret to a 0600 file under the box user's home; return its absolute path. It travels on the SSH
    channel's stdin, never on a command line (which `ps` would show), and is never printed."""
    path = run(conn, f'printf %s "$HOME/{relpath}"').stdout
    q = shlex.quote(path)
    cmd = f"umask 077 && mkdir -p \"$(dirname {q})\" && cat > {q}.tmp && chmod 600 {q}.tmp && mv {q}.tmp {q}"
    if stream(conn, cmd, out=io.StringIO(), stdin_chunks=[body]) != 0:
        raise UserError(f"could not write {relpath} on {conn.host}: check that ~/.config is writable there")
    return path


def send_hf_token(conn, out=sys.stdout) -> str | None:
    """The token on the box as a 0600 file (for the download container only), or None: anonymous, rate-limited."""
    token = hf_token()
    if not token:
        out.write("data: no Hugging Face token on this machine (HF_TOKEN or `hf auth login`): downloading anonymously, "
                  "which the hub rate-limits\n")
        return None
    out.write("data: with this machine's Hugging Face token (a 0600 file on the box, mounted read-only)\n")
    return send_secret(conn, HF_TOKEN_FILE, token.encode())


def send_aws_credentials(conn) -> str:
    """The laptop's AWS credentials (the usual chain), as a shared-credentials file on the box."""
    return send_secret(conn, CREDENTIALS, aws_credentials_file())


def aws_credentials_file() -> bytes:
    """The laptop's AWS credentials as a shared-credentials file; one line of error when there are none."""
    import boto3

    session = boto3.Session()
    creds = session.get_credentials()
    if creds is None:
        raise UserError("--sync-s3 needs AWS credentials on this machine: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                        "(or run aws configure)")
    frozen = creds.get_frozen_credentials()
    lines = ["[default]", f"aws_access_key_id = {frozen.access_key}", f"aws_secret_access_key = {frozen.secret_key}"]
    if frozen.token:
        lines.append(f"aws_session_token = {frozen.token}")
    if session.region_name:
        lines.append(f"region = {session.region_name}")
    return ("\n".join(lines) + "\n").encode()


# ---- W&B: the API key for the trainer on the box --------------------------------------------------------

def wants_wandb(trainer_args: list[str]) -> bool:
    return any(a == "--wandb" or a.startswith("--wandb=") for a in trainer_args)


def laptop_wandb_key() -> str:
    """The W&B key as W&B itself finds it on this machine: WANDB_API_KEY, else ~/.netrc (what `wandb login` writes)."""
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        try:
            entry = netrc.netrc(os.environ.get("NETRC")).authenticators(WANDB_HOST)
        except (OSError, netrc.NetrcParseError):
            entry = None
        key = entry[2] if entry else None
    if not key:
        raise UserError("--wandb needs a W&B API key on this machine: run `wandb login` (or set WANDB_API_KEY), "
                        "or add --env WANDB_MODE=offline to keep the run on the box")
    return key.strip()


def send_wandb_key(conn, job) -> None:
    """The key as a 0600 file on the box, mounted read-only where the trainer reads it: in no command line, no
    environment variable (which `docker inspect` shows) and no log."""
    if not wants_wandb(job.trainer_args):
        return
    try:
        key = laptop_wandb_key()
    except UserError:
        if wandb_offline(job):
            return  # an offline run needs no key (`wandb sync` uploads it later)
        raise
    job.mounts[send_secret(conn, WANDB_KEY, key.encode())] = contract.WANDB_KEY_FILE


def wandb_offline(job) -> bool:
    return job.env.get("WANDB_MODE") in ("offline", "disabled")


def check_wandb_key(job) -> None:
    """Before anything happens on the box: --wandb online needs a key here."""
    if wants_wandb(job.trainer_args) and not wandb_offline(job):
        laptop_wandb_key()
