"""Where a service keeps its files: uploads (first frames) and outputs (the mp4 and its variants),
under keys such as "videos/<id>.mp4" (outputs.JobFiles names them).

`LocalStorage` is the data dir (the default: one machine). `S3Storage` is a bucket of any
S3-compatible store (AWS S3, MinIO, Cloudflare R2, GCS through its XML API), written with boto3, so
services on several machines, sharing one PostgreSQL queue, serve each other's videos. Both take
the same calls: put (bytes, or a finished file; an object that exists is complete), read, delete,
`check` (reachable at start), and `download`, which says how the HTTP layer hands an object to a
client: a local file, a stream from the bucket, or a presigned URL to redirect to.

Every failure to reach or write the store is a StorageError in one line naming the object; a
job whose outputs cannot be written fails with it (code "storage_failed"), and the service goes on.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

MiB = 2**20
MULTIPART_BYTES = 16 * MiB   # files at least this big are uploaded in parts of this size, in parallel
PRESIGN_S = 900              # how long a presigned URL (--presign) stays valid
STREAM_CHUNK = 256 * 1024    # what a streamed download reads from the bucket at a time


class StorageError(RuntimeError):
    """The store cannot be reached, or refused a read or write; one line."""


@dataclass(frozen=True)
class StorageConfig:
    """Which storage a service and its workers open (picklable: it crosses into the workers).
    url None: the data dir; "s3://bucket/prefix": that bucket. The credentials and the region come
    from boto3's usual places (AWS_ACCESS_KEY_ID..., AWS_PROFILE, an instance role)."""

    url: Optional[str] = None
    endpoint_url: Optional[str] = None      # MinIO, R2, ...; None: $AWS_ENDPOINT_URL, else AWS
    presign: bool = False                   # content requests redirect to a presigned URL
    multipart_bytes: int = MULTIPART_BYTES

    def __post_init__(self) -> None:
        if self.url is not None:
            parse_s3_url(self.url)
        elif self.endpoint_url is not None or self.presign:
            raise ValueError("an S3 endpoint and presigned URLs need an s3://bucket/prefix storage")


def parse_s3_url(url: str) -> tuple[str, str]:
    """"s3://bucket/some/prefix" -> ("bucket", "some/prefix"); ValueError (one line) otherwise."""
    if not url.startswith("s3://"):
        raise ValueError(f"storage must be s3://bucket/prefix (GCS, R2, MinIO: through their S3 APIs); got {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"storage {url!r} names no bucket: s3://bucket/prefix")
    return bucket, prefix.strip("/")


@dataclass
class Download:
    """How to hand one object to an HTTP client: exactly one of path, url, chunks is set."""

    path: Optional[Path] = None             # a local file (served with range requests)
    url: Optional[str] = None               # a presigned URL to redirect to
    chunks: Optional[Iterator[bytes]] = None
    size: Optional[int] = None


Storage = Union["LocalStorage", "S3Storage"]


def open_storage(config: StorageConfig, data_dir: Union[str, os.PathLike]) -> Storage:
    if config.url is None:
        return LocalStorage(data_dir)
    bucket, prefix = parse_s3_url(config.url)
    return S3Storage(bucket, prefix, config.endpoint_url, config.presign, config.multipart_bytes)


class LocalStorage:
    """Objects are files under `root` (the data dir); each is written to a temporary name and renamed."""

    def __init__(self, root: Union[str, os.PathLike]):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def where(self, key: str) -> str:
        return str(self.path(key))

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None

    def put_file(self, key: str, source: Path, content_type: str) -> None:
        """Move the finished file `source` (on the same file system) to `key`."""
        try:
            self.path(key).parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, self.path(key))
        except OSError as exc:
            raise StorageError(f"cannot write {self.path(key)}: {exc.strerror or exc}") from None

    def read(self, key: str) -> bytes:
        """FileNotFoundError when there is no such object."""
        return self.path(key).read_bytes()

    def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.path(key).unlink(missing_ok=True)

    def download(self, key: str) -> Optional[Download]:
        """None when there is no such object."""
        path = self.path(key)
        return Download(path=path) if path.is_file() else None


class S3Storage:
    """Objects in `bucket` under `prefix`/. One boto3 client per process (boto3's clients are
    thread-safe); its retries (standard mode) ride out a store's brief hiccups."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: Optional[str] = None, presign: bool = False,
                 multipart_bytes: int = MULTIPART_BYTES):
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError:
            raise StorageError("S3 storage needs boto3: pip install 'wan-rt[s3]'") from None
        self.bucket, self.prefix, self.presign = bucket, prefix, presign
        self.client = boto3.client("s3", endpoint_url=endpoint_url,
                                   config=Config(retries={"max_attempts": 4, "mode": "standard"},
                                                 connect_timeout=10, read_timeout=60,
                                                 signature_version="s3v4"))  # presigned URLs: every region, R2, GCS
        # upload_file sends a file of at least multipart_bytes as a multipart upload, parts in parallel.
        self._transfer = TransferConfig(multipart_threshold=multipart_bytes, multipart_chunksize=multipart_bytes)

    def key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.key(key)}"

    def check(self) -> None:
        with self._errors("reach", f"s3://{self.bucket}"):
            self.client.head_bucket(Bucket=self.bucket)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        with self._errors("write", self.where(key)):
            self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=data, ContentType=content_type)

    def put_file(self, key: str, source: Path, content_type: str) -> None:
        """Upload the finished file `source` (multipart when large), then remove it."""
        try:
            with self._errors("write", self.where(key)):
                self.client.upload_file(str(source), self.bucket, self.key(key),
                                        ExtraArgs={"ContentType": content_type}, Config=self._transfer)
        finally:
            Path(source).unlink(missing_ok=True)

    def read(self, key: str) -> bytes:
        got = self._get(key)
        if got is None:
            raise FileNotFoundError(f"no object {self.where(key)}")
        with self._errors("read", self.where(key)):
            try:
                return got["Body"].read()
            finally:
                got["Body"].close()

    def delete(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        with self._errors("delete", self.where(keys[0])):
            result = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": self.key(k)} for k in keys], "Quiet": True})
        if result.get("Errors"):
            first = result["Errors"][0]
            raise StorageError(f"cannot delete s3://{self.bucket}/{first.get('Key')}: {first.get('Code')}: "
                               f"{first.get('Message')}")

    def download(self, key: str) -> Optional[Download]:
        """A presigned URL (presign) or a stream of the object; None when there is no such object."""
        if self.presign:
            with self._errors("read", self.where(key)):
                if not self._exists(key):
                    return None
                url = self.client.generate_presigned_url(
                    "get_object", Params={"Bucket": self.bucket, "Key": self.key(key)}, ExpiresIn=PRESIGN_S)
            return Download(url=url)
        got = self._get(key)
        if got is None:
            return None
        return Download(chunks=_chunks(got["Body"]), size=got.get("ContentLength"))

    # ---------------------------------------------------------------- internals
    def _get(self, key: str) -> Optional[dict]:
        with self._errors("read", self.where(key)):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self.key(key))
            except self.client.exceptions.NoSuchKey:
                return None

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    @staticmethod
    @contextlib.contextmanager
    def _errors(action: str, where: str) -> Iterator[None]:
        """boto3's exceptions -> StorageError("cannot write s3://b/k: AccessDenied: Access Denied")."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code") or "error"
            message = error.get("Message") or _HTTP_REASONS.get(code, "")
            raise StorageError(f"cannot {action} {where}: {code}: {message}" if message
                               else f"cannot {action} {where}: {code}") from None
        except (BotoCoreError, S3UploadFailedError) as exc:
            text = str(exc).strip()
            raise StorageError(f"cannot {action} {where}: {text.splitlines()[0] if text else type(exc).__name__}") \
                from None


# A HEAD answers with a bare status code (no XML body): its reason, for the one-line error.
_HTTP_REASONS = {"403": "Forbidden (access denied)", "404": "Not Found", "400": "Bad Request"}


def _chunks(body) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(STREAM_CHUNK)
    finally:
        body.close()
