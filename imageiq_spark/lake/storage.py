"""Files under `storage.root` that are not tables, from Python on the driver or an executor.

Reports, sample grids, training checkpoints and staging folders live beside the tables: on local
disk, or in object storage where executors on other hosts can reach them. Spark reaches `s3a://`
through Hadoop's S3A; Python reaches the same objects through pyarrow's S3 file system, which takes
the standard AWS variables for the keys but, in pyarrow 14, not `AWS_ENDPOINT_URL_S3` for an
S3-compatible server (MinIO, Ceph, moto): it is read here, the same variable `session.s3a_defaults`
gives S3A.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from pyarrow import fs

OBJECT_STORE_SCHEMES = ("s3a", "s3", "s3n")


def is_local(uri: str) -> bool:
    """True for a path or a `file:` URI; object storage (`s3a://`, `s3://` ...) is not."""
    return urlparse(uri).scheme in ("", "file")


def filesystem(uri: str) -> tuple[fs.FileSystem, str]:
    """The pyarrow file system holding `uri`, and the path of `uri` on it."""
    parsed = urlparse(uri)
    if is_local(uri):
        path = parsed.path if parsed.scheme == "file" else uri
        return fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if parsed.scheme in OBJECT_STORE_SCHEMES:
        return s3_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    return fs.FileSystem.from_uri(uri)


def s3_filesystem() -> fs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    options: dict[str, object] = {"region": region} if region else {}
    if endpoint:
        address = urlparse(endpoint)
        options.update(endpoint_override=address.netloc, scheme=address.scheme or "https")
    return fs.S3FileSystem(**options)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file; readers see the old file or the new one, never half of it."""
    filesystem_, path = filesystem(uri)
    filesystem_.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if isinstance(filesystem_, fs.LocalFileSystem):
        # An object store PUT is atomic; a local write is made so by a rename.
        tmp = f"{path}.tmp-{os.getpid()}"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
        return
    with filesystem_.open_output_stream(path) as out:
        out.write(data)


def read_bytes(uri: str) -> bytes | None:
    """A whole file, or None when there is none."""
    filesystem_, path = filesystem(uri)
    if filesystem_.get_file_info(path).type != fs.FileType.File:
        return None
    with filesystem_.open_input_stream(path) as source:
        return source.read()


def exists(uri: str) -> bool:
    filesystem_, path = filesystem(uri)
    return filesystem_.get_file_info(path).type == fs.FileType.File


def folder_exists(uri: str) -> bool:
    filesystem_, path = filesystem(uri)
    return filesystem_.get_file_info(path).type == fs.FileType.Directory


def put_file(local: str | Path, uri: str) -> None:
    """Copy a local file to `uri` (replacing it)."""
    write_bytes(uri, Path(local).read_bytes())


@contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local path holding the file at `uri` for the duration of the block (Keras and TensorFlow
    load weights only from local paths)."""
    filesystem_, path = filesystem(uri)
    if isinstance(filesystem_, fs.LocalFileSystem):
        yield path
        return
    folder = tempfile.mkdtemp(prefix="imageiq-")
    try:
        local = os.path.join(folder, os.path.basename(path))
        with filesystem_.open_input_stream(path) as source, open(local, "wb") as out:
            shutil.copyfileobj(source, out)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def delete_dir(uri: str) -> None:
    """Delete a folder and everything under it; a missing folder is not an error."""
    filesystem_, path = filesystem(uri)
    if filesystem_.get_file_info(path).type == fs.FileType.Directory:
        filesystem_.delete_dir(path)
