"""Where artifacts live: local paths, ``s3://bucket/prefix`` and ``gs://bucket/prefix``.

One layer over :mod:`pyarrow.fs`: :func:`resolve` turns a path or URI into
``(FileSystem, path)``; local paths stay local. The helpers below (bytes and text, exists,
list, delete a prefix) work the same on every filesystem.

S3 settings come from the standard AWS environment, as boto3, pyarrow and the AWS CLI
read it: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for an S3-compatible server,
``AWS_REGION`` (or ``AWS_DEFAULT_REGION``), and ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``; without keys, the AWS default chain
(profile, instance or pod role). pyarrow's ``S3FileSystem()`` does not read
``AWS_ENDPOINT_URL`` by itself (only ``FileSystem.from_uri`` does), so it is passed
explicitly. Keys found in the environment are passed explicitly too, so a filesystem
handed to a Ray task (pickled through the object store of the cluster) writes with the
driver's settings; with roles, no key leaves the node. ``gs://`` uses pyarrow's
``GcsFileSystem`` with Google's default credentials (``GOOGLE_APPLICATION_CREDENTIALS``;
``STORAGE_EMULATOR_HOST`` for an emulator).

Objects are written whole: an S3 or GCS object appears only when its upload completes, so
no reader sees half an object; there is no atomic rename (see :mod:`cellfoundry.artifacts`
for how artifacts commit). :func:`check_reachable` turns a missing bucket, refused
credentials or an unreachable endpoint into a :class:`StorageError` that names the URI
and the variable to fix, before any work starts.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMES = ("s3", "gs")
"""URI schemes of object stores (``gcs://`` is read as ``gs://``)."""


class StorageError(ValueError):
    """An object store cannot be used as configured (bucket, credentials, endpoint)."""


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is an object-store URI (``s3://``, ``gs://``, ``gcs://``)."""
    text = str(path)
    return text.startswith(("s3://", "gs://", "gcs://"))


def split(uri: str) -> tuple[str, str, str]:
    """``(scheme, bucket, key)`` of an object-store URI; the key has no leading or
    trailing slash."""
    scheme, _, rest = str(uri).partition("://")
    scheme = "gs" if scheme == "gcs" else scheme
    if scheme not in SCHEMES:
        raise StorageError(f"{uri}: not an object-store URI (expected s3:// or gs://)")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name (expected {scheme}://bucket/prefix)")
    return scheme, bucket, key.strip("/")


def normalize(path: str | Path) -> str:
    """A canonical form: absolute local path, or ``scheme://bucket/key`` with no trailing
    slash (``gcs://`` becomes ``gs://``)."""
    if not is_remote(path):
        return str(Path(path).expanduser().resolve())
    scheme, bucket, key = split(str(path))
    return f"{scheme}://{bucket}/{key}" if key else f"{scheme}://{bucket}"


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI."""
    if not is_remote(base):
        return str(Path(base, *parts))
    return "/".join([normalize(base), *(p.strip("/") for p in parts if p.strip("/"))])


def parent(path: str | Path) -> str:
    """The folder or prefix that holds ``path``."""
    if not is_remote(path):
        return str(Path(path).parent)
    scheme, bucket, key = split(str(path))
    head = key.rpartition("/")[0]
    return f"{scheme}://{bucket}/{head}" if head else f"{scheme}://{bucket}"


def name(path: str | Path) -> str:
    """The last component of ``path`` (empty for a bucket)."""
    if not is_remote(path):
        return Path(path).name
    return split(str(path))[2].rpartition("/")[2]


# --- filesystems ------------------------------------------------------------------------

_S3_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
           "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")  # fmt: skip
_GCS_ENV = ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")
_CACHE: dict[tuple[Any, ...], Any] = {}
_CACHE_LOCK = threading.Lock()


def _clear_cache() -> None:  # a forked child builds its own clients
    global _CACHE_LOCK
    _CACHE.clear()
    _CACHE_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_clear_cache)


def _cached(kind: str, env: tuple[str, ...], build: Any) -> Any:
    """One client per kind and environment (a changed variable builds a new one)."""
    key = (kind, *(os.environ.get(v) for v in env))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str | None:
    """The AWS region from the environment (``AWS_REGION``, then ``AWS_DEFAULT_REGION``)."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def _build_s3() -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {}
    if s3_endpoint():
        kwargs["endpoint_override"] = s3_endpoint()
    if s3_region():
        kwargs["region"] = s3_region()
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def _build_gcs() -> pafs.FileSystem:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        scheme, _, host = emulator.rpartition("://")
        return pafs.GcsFileSystem(
            anonymous=True, endpoint_override=host or emulator, scheme=scheme or "http"
        )
    return pafs.GcsFileSystem()


def filesystem(path: str | Path) -> pafs.FileSystem:
    """The pyarrow filesystem that holds ``path`` (configured from the environment)."""
    if not is_remote(path):
        return pafs.LocalFileSystem()
    scheme = split(str(path))[0]
    if scheme == "s3":
        return _cached("s3fs", _S3_ENV, _build_s3)
    return _cached("gcsfs", _GCS_ENV, _build_gcs)


def resolve(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path within it)``: local paths stay local (absolute); ``s3://b/k``
    gives an ``S3FileSystem`` and ``b/k``; ``gs://b/k`` a ``GcsFileSystem`` and ``b/k``."""
    if not is_remote(path):
        return pafs.LocalFileSystem(), normalize(path)
    _, bucket, key = split(str(path))
    return filesystem(path), f"{bucket}/{key}" if key else bucket


def s3_client() -> Any:
    """A boto3 S3 client configured from the same environment (for what pyarrow cannot do:
    conditional writes, precise error codes)."""

    def build() -> Any:
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5,
                        read_timeout=30)  # fmt: skip
        return boto3.session.Session().client(
            "s3", endpoint_url=s3_endpoint(), region_name=s3_region() or "us-east-1",
            config=config,
        )  # fmt: skip

    return _cached("boto3", _S3_ENV, build)


# --- small helpers ----------------------------------------------------------------------


def _wrap(path: str | Path, exc: OSError) -> Exception:
    """A clear error for an object-store failure (diagnosed), else the error itself."""
    if not is_remote(path) or isinstance(exc, FileNotFoundError):
        return exc
    try:
        check_reachable(str(path))
    except StorageError as clear:
        return clear
    return exc


def read_bytes(path: str | Path) -> bytes:
    """The bytes of a file or object; :class:`FileNotFoundError` if there is none."""
    fs, p = resolve(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if is_remote(path) and fs.get_file_info(p).type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(path)) from None
        raise _wrap(path, exc) from exc


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a file or object."""
    return read_bytes(path).decode()


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a whole file or object: readers see the old or the new bytes, never part.

    Locally through a temp file and a rename; an object appears when its upload completes.
    """
    fs, p = resolve(path)
    if not is_remote(path):
        file = Path(p)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, file)
        return
    try:
        with fs.open_output_stream(p) as f:
            f.write(data)
    except OSError as exc:
        raise _wrap(path, exc) from exc


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text (see :func:`write_bytes`)."""
    write_bytes(path, text.encode())


def write_parquet(table: pa.Table, path: str, filesystem: pafs.FileSystem | None = None) -> None:
    """Write ``table`` as one Parquet file; readers never see half a file.

    ``path`` is within ``filesystem`` (from :func:`resolve`; None: a local path or a URI).
    Locally the file is written under a temp name and renamed; an object appears whole.
    """
    if filesystem is None:
        filesystem, path = resolve(path)
    if isinstance(filesystem, pafs.LocalFileSystem):
        file = Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        pq.write_table(table, tmp)
        os.replace(tmp, file)
    else:
        pq.write_table(table, path, filesystem=filesystem)


def upload_dir(local: str | Path, dest: str | Path) -> dict[str, int]:
    """Copy every file under the local folder ``local`` to ``dest`` (a folder or prefix),
    keeping relative paths; returns ``{relative path: size}`` of what was copied. Each
    object appears whole; a failure part-way leaves some objects (the caller's prefix is
    run-unique, see :mod:`cellfoundry.artifacts`)."""
    root = Path(local)
    done: dict[str, int] = {}
    for file in sorted(f for f in root.rglob("*") if f.is_file()):
        rel = file.relative_to(root).as_posix()
        fs, p = resolve(join(dest, rel))
        try:
            pafs.copy_files(str(file), p, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)  # fmt: skip
        except OSError as exc:
            raise _wrap(dest, exc) from exc
        done[rel] = file.stat().st_size
    return done


def download_file(src: str | Path, local: str | Path) -> None:
    """Copy one file or object to the local path ``local`` (parents created), streamed
    (never held whole in memory); the file appears whole (temp name, then rename)."""
    file = Path(local)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp-{uuid.uuid4().hex[:8]}")
    fs, p = resolve(src)
    try:
        pafs.copy_files(p, str(tmp), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
    except FileNotFoundError:
        raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_remote(src) and fs.get_file_info(p).type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(src)) from None
        raise _wrap(src, exc) from exc
    os.replace(tmp, file)


def info(path: str | Path) -> pafs.FileInfo:
    """pyarrow's ``FileInfo`` of ``path`` (type NotFound, File or Directory)."""
    fs, p = resolve(path)
    try:
        return fs.get_file_info(p)
    except OSError as exc:
        raise _wrap(path, exc) from exc


def exists(path: str | Path) -> bool:
    """Whether a file, object, folder or non-empty prefix is at ``path``."""
    return info(path).type != pafs.FileType.NotFound


def is_file(path: str | Path) -> bool:
    """Whether a file or object is at ``path``."""
    return info(path).type == pafs.FileType.File


def list_files(path: str | Path, *, recursive: bool = True) -> dict[str, int]:
    """``{relative path: size in bytes}`` of the files under ``path`` (sorted; empty if
    nothing is there)."""
    fs, p = resolve(path)
    try:
        found = fs.get_file_info(pafs.FileSelector(p, recursive=recursive, allow_not_found=True))
    except OSError as exc:
        raise _wrap(path, exc) from exc
    base = p.rstrip("/") + "/"
    return {
        i.path[len(base) :]: int(i.size or 0)
        for i in sorted(found, key=lambda i: i.path)
        if i.type == pafs.FileType.File
    }


def list_children(path: str | Path) -> dict[str, bool]:
    """``{name: is a folder or prefix}`` directly under ``path`` (empty if nothing)."""
    fs, p = resolve(path)
    try:
        found = fs.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise _wrap(path, exc) from exc
    return {i.base_name: i.type == pafs.FileType.Directory for i in found}


def _s3_delete(bucket: str, keys: list[str]) -> None:
    client = s3_client()
    for i in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[i : i + 1000]]
        done = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        if done.get("Errors"):
            raise OSError(f"s3://{bucket}: could not delete {done['Errors'][:3]}")


def delete_file(path: str | Path, *, missing_ok: bool = True) -> None:
    """Delete one file or object (on S3 without the empty "folder" marker objects that
    pyarrow leaves behind)."""
    if is_remote(path) and split(str(path))[0] == "s3":
        _, bucket, key = split(str(path))
        if not missing_ok and not is_file(path):
            raise FileNotFoundError(str(path))
        _s3_delete(bucket, [key])
        return
    fs, p = resolve(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        if not missing_ok:
            raise
    except OSError as exc:
        raise _wrap(path, exc) from exc


def delete_prefix(path: str | Path) -> None:
    """Delete a folder, or every object under a prefix (nothing there: nothing to do)."""
    if is_remote(path) and split(str(path))[0] == "s3":
        _, bucket, key = split(str(path))
        if not key:
            raise StorageError(f"{path}: refusing to delete a whole bucket")
        keys: list[str] = []
        pages = (
            s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/")
        )
        for page in pages:
            keys += [o["Key"] for o in page.get("Contents", [])]
        _s3_delete(bucket, keys)
        return
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return
    try:
        fs.delete_dir(p)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _wrap(path, exc) from exc


# --- preflight --------------------------------------------------------------------------

_CREDENTIAL_CODES = {
    "InvalidAccessKeyId": "AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "AWS_SECRET_ACCESS_KEY",
    "InvalidToken": "AWS_SESSION_TOKEN",
    "ExpiredToken": "AWS_SESSION_TOKEN",
    "TokenRefreshRequired": "AWS_SESSION_TOKEN",
}


def _endpoint_text() -> str:
    endpoint = s3_endpoint()
    return f"AWS_ENDPOINT_URL={endpoint}" if endpoint else "AWS itself (AWS_ENDPOINT_URL unset)"


def check_reachable(uri: str | Path) -> None:
    """Raise :class:`StorageError` naming ``uri`` and the variable to fix unless its bucket
    exists and answers with the configured credentials. Local paths pass (nothing to check).
    """
    if not is_remote(uri):
        return
    scheme, bucket, key = split(str(uri))
    if scheme == "s3":
        _check_s3(str(uri), bucket, key)
    else:
        _check_gcs(str(uri), bucket)


def _check_s3(uri: str, bucket: str, key: str) -> None:
    import botocore.exceptions as bex

    where = _endpoint_text()
    try:
        s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    except bex.NoCredentialsError:
        raise StorageError(
            f"{uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or a profile or role)"
        ) from None
    except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ConnectionError) as exc:
        raise StorageError(
            f"{uri}: cannot reach the S3 endpoint ({where}): {exc}; fix AWS_ENDPOINT_URL "
            "or start the server"
        ) from None
    except bex.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket", "404") or status == 404:
            raise StorageError(
                f"{uri}: bucket {bucket!r} does not exist at {where}; create it, or fix the "
                "URI or AWS_ENDPOINT_URL"
            ) from None
        if code in _CREDENTIAL_CODES:
            var = _CREDENTIAL_CODES[code]
            raise StorageError(
                f"{uri}: the S3 server at {where} refused the credentials ({code}); fix {var}"
            ) from None
        if code in ("AccessDenied", "403", "AllAccessDisabled") or status == 403:
            raise StorageError(
                f"{uri}: access to bucket {bucket!r} denied ({code}) at {where}; fix "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the bucket's policy"
            ) from None
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "301", "400"):
            raise StorageError(
                f"{uri}: bucket {bucket!r} is in another region ({code}); fix AWS_REGION"
            ) from None
        raise StorageError(f"{uri}: S3 error {code} at {where}: {exc}") from None
    except bex.BotoCoreError as exc:
        raise StorageError(f"{uri}: cannot use S3 at {where}: {exc}") from None


def _check_gcs(uri: str, bucket: str) -> None:
    try:
        found = filesystem(uri).get_file_info(bucket)
    except OSError as exc:
        raise StorageError(
            f"{uri}: cannot use GCS: {exc}; fix GOOGLE_APPLICATION_CREDENTIALS (or "
            "STORAGE_EMULATOR_HOST)"
        ) from None
    if found.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: bucket {bucket!r} does not exist; create it or fix the URI")


# --- the driver's settings, carried into Ray tasks ---------------------------------------

CACHE_ENV = "CELLFOUNDRY_CACHE_DIR"
"""Where remote artifacts are cached on a node (see :func:`cellfoundry.artifacts.localize`)."""
STORAGE_ENV = (*_S3_ENV, *_GCS_ENV, CACHE_ENV)
"""What this module reads from the environment (endpoint, region, keys), and the cache folder."""


@dataclass(frozen=True)
class StorageEnv:
    """The driver's object-storage variables, to apply inside a Ray task, actor, trial or
    training worker.

    A Ray worker runs with the environment its node was started with, which on a cluster
    the driver joined (or in a test whose S3 server started after Ray) lacks the driver's
    settings. So a stage that hands a URI to workers captures the settings on the driver
    (:meth:`capture`) and passes them as an argument, as the pickled filesystems of this
    module travel; never in a runtime env or ``train_loop_config``, which Ray records in its
    state API and dashboard. Nodes with their own settings (instance or pod roles) need
    nothing, and a run whose paths are all local captures nothing."""

    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def capture(cls, *paths: str | Path | None) -> StorageEnv:
        """The driver's settings when one of ``paths`` is on object storage, else none."""
        if not any(p is not None and is_remote(p) for p in paths):
            return cls()
        return cls({k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)})

    def __repr__(self) -> str:  # never print the keys
        return f"StorageEnv({sorted(self.env)})"

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block, this process's environment holds these settings; the previous
        values come back afterwards (Ray reuses worker processes)."""
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
