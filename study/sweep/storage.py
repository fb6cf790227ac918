"""Remote results storage (`--storage URI`): s3://bucket/prefix, or a path on shared storage (NFS).

The driver works in a local results directory (`--out`) and mirrors it to `URI/<study>/` at the end of
each phase and of the run: Parquet tables, the Optuna journal, the manifest, the spec, trial records
and plots. `--resume` on a machine without the local directory first downloads the mirror. Epoch
checkpoints stay local (they are large and only useful to the node that wrote them), so a trial
interrupted on another machine restarts from its first epoch.

S3 endpoints other than AWS (MinIO, moto, ...) come from the standard `AWS_ENDPOINT_URL` variable.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

MIRRORED = (
    "trials.parquet",
    "epochs.parquet",
    "evals.parquet",
    "summary.parquet",
    "projections.parquet",
    "optuna.journal",
    "manifest.json",
    "spec.yaml",
)
MIRRORED_DIRS = ("records", "plots")


_UPLOADED: dict[tuple[str, str], int] = {}


class StorageError(ValueError):
    """The storage URI is malformed or unreachable (exit code 2, before any trial starts)."""


def open_storage(uri: str, timeout_s: float = 5.0) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path) for a URI; fails fast with a one-line StorageError."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"--storage {uri!r}: an S3 URI needs a bucket, e.g. s3://bucket/prefix")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict = {
            "connect_timeout": timeout_s,
            "request_timeout": timeout_s,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        }
        if endpoint:
            ep = urlparse(endpoint)
            kwargs.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "http")
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme in ("", "file"):
        return pafs.LocalFileSystem(), str(Path(parsed.path if parsed.scheme else uri).resolve())
    raise StorageError(
        f"--storage {uri!r}: unsupported scheme {parsed.scheme!r} (allowed: s3://, a local/NFS path)"
    )


def check_writable(fs: pafs.FileSystem, base: str, uri: str) -> None:
    """Write and delete a probe object, so a wrong bucket, endpoint or permission fails before the study."""
    probe = f"{base}/.regstudy-probe-{uuid.uuid4().hex[:8]}"
    try:
        created = fs.get_file_info(base).type == pafs.FileType.NotFound
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
        if created:  # the run creates it again when it writes there
            fs.delete_dir(base)
    except OSError as exc:  # pyarrow raises OSError subclasses for S3 and filesystem errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"--storage {uri}: cannot write there ({first})") from None


def upload(fs: pafs.FileSystem, base: str, local: Path, *, light: bool = False) -> None:
    """Mirror the results directory's durable files to base/ (each file replaced whole).

    `light` mirrors only the journal, the manifest and the trial records (what resume needs)."""
    fs.create_dir(base, recursive=True)
    names = ("optuna.journal", "manifest.json", "spec.yaml") if light else MIRRORED
    for name in names:
        src = local / name
        if src.exists():
            pafs.copy_files(
                str(src),
                f"{base}/{name}",
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=fs,
            )
    for d in ("records",) if light else MIRRORED_DIRS:
        src = local / d
        if not src.is_dir():
            continue
        for path in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix != ".tmp"):
            # Only new or changed files: a study uploads after every trial, so re-sending every
            # record each time would cost O(trials^2) requests.
            key = (base, str(path))
            mtime = path.stat().st_mtime_ns
            if _UPLOADED.get(key) == mtime:
                continue
            rel = path.relative_to(local).as_posix()
            fs.create_dir(f"{base}/{Path(rel).parent.as_posix()}", recursive=True)
            pafs.copy_files(
                str(path),
                f"{base}/{rel}",
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=fs,
            )
            _UPLOADED[key] = mtime


def download(fs: pafs.FileSystem, base: str, local: Path) -> bool:
    """Fetch a mirrored study into `local`; False if nothing is stored at base."""
    info = fs.get_file_info(f"{base}/manifest.json")
    if info.type == pafs.FileType.NotFound:
        return False
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(base, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return True
