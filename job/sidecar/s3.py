"""Upload checkpoints to S3 with boto3: multipart, verified, incremental.

Shared by the laptop (`fab fetch-weights --s3`) and the box (the S3 sidecar; the cost guard's check of what is
in S3), so both write and read the same sha256 metadata: it lives in job/sidecar/, which the image installs, and
imports no torch. Credentials come from the usual AWS chain (env, ~/.aws, SSO, instance role); nothing here
prints or stores them. AWS_ENDPOINT_URL (or --s3-endpoint) points at any S3-compatible store.
Each object carries the sha256 of its bytes as metadata: a re-run skips objects whose size and sha256
match, and every upload is checked (size + sha256 read back) before it counts as done. In transit,
botocore adds its own per-request checksum that S3 verifies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from job.errors import UserError, http_url
from job.sidecar.digest import sha256_file

MIB = 2**20


@dataclass
class UploadReport:
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)  # name -> digest, verified in S3 (uploaded or skipped)


def parse_s3_url(url: str) -> tuple[str, str]:
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise UserError(f"{url!r} is not an S3 URL: use s3://BUCKET/PREFIX")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


def check_endpoint(endpoint_url: str | None) -> str | None:
    if endpoint_url:
        http_url(endpoint_url, "the S3 endpoint", "pass one like https://s3.us-east-1.amazonaws.com, or leave it out for AWS")
    return endpoint_url


def client(endpoint_url: str | None = None):
    import boto3

    check_endpoint(endpoint_url)
    return boto3.client("s3", endpoint_url=endpoint_url)


def upload_files(paths: list[Path], url: str, s3=None, chunk_mib: int = 64) -> UploadReport:
    from boto3.exceptions import S3UploadFailedError
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, prefix = parse_s3_url(url)
    s3 = s3 or client()
    # Multipart above one chunk: parallel parts, and a failed part is retried alone, not the whole 1.5 GB file.
    config = TransferConfig(multipart_threshold=chunk_mib * MIB, multipart_chunksize=chunk_mib * MIB, max_concurrency=8)
    report = UploadReport()
    try:
        for path in sorted(paths):
            key = f"{prefix}/{path.name}" if prefix else path.name
            digest, size = sha256_file(path), path.stat().st_size
            report.sha256[path.name] = digest
            if _matches(s3, bucket, key, size, digest):
                report.skipped.append(path.name)
                continue
            s3.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": digest}}, Config=config)
            if not _matches(s3, bucket, key, size, digest):
                raise UserError(f"s3://{bucket}/{key} does not match {path} after upload (size or sha256): run the upload again")
            report.uploaded.append(path.name)
    except NoCredentialsError:
        raise UserError("no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or run aws configure)") from None
    except (ClientError, S3UploadFailedError) as e:
        cause = e if isinstance(e, ClientError) else e.__cause__ or e.__context__
        code = cause.response.get("Error", {}).get("Code", "error") if isinstance(cause, ClientError) else "upload failed"
        raise UserError(f"S3 refused the upload to s3://{bucket} ({code}): check the bucket name, region and your permissions") from None
    except BotoCoreError as e:
        raise UserError(f"cannot reach S3 for s3://{bucket} ({type(e).__name__}): check the network or AWS_ENDPOINT_URL") from None
    return report


def _matches(s3, bucket: str, key: str, size: int, digest: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return head["ContentLength"] == size and head.get("Metadata", {}).get("sha256") == digest
