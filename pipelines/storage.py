"""Where an ingest output lives: a local folder or an object-store prefix (``s3://``, ``gs://``), behind one
``pyarrow.fs`` file system.

``locate(where)`` turns a path or URI into a ``Location`` (file system, path inside it, and the text to print).
Object stores take their credentials and endpoint from the standard environment, as pyarrow and boto3 read it:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION`` and
``AWS_ENDPOINT_URL`` (MinIO, moto and other S3-compatible stores) for S3; ``GOOGLE_APPLICATION_CREDENTIALS`` for
GCS. A ``Location`` is rebuilt from its URI wherever it is used (a Ray task on another node reads that node's
environment); it is never pickled with credentials in it.

Any ``scheme:`` text that is not a supported URI raises ``ValueError`` naming it: ``s3:/bucket`` or ``ftp://host``
is never taken as a local folder name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs", "gcs")
"""URI schemes of object stores (``gcs`` is pyarrow's alias of ``gs``)."""
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two or more characters: a Windows drive "C:" is a path


class StorageError(OSError):
    """An object store (or its bucket) cannot be reached with the credentials of this environment."""


@dataclass(frozen=True)
class Location:
    """A folder or file: ``filesystem`` and ``path`` inside it; ``uri`` is how it was named (absolute for a local
    path), the form to print and to pass to another process."""

    uri: str
    filesystem: pafs.FileSystem
    path: str

    @property
    def is_remote(self) -> bool:
        return "://" in self.uri

    def child(self, name: str) -> Location:
        """The location of ``name`` (a relative ``a/b`` path) inside this folder."""
        name = name.strip("/")
        return Location(f"{self.uri.rstrip('/')}/{name}", self.filesystem, f"{self.path.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.uri


def is_uri(where: str | Path) -> bool:
    """Whether ``where`` names a URI (``scheme:...``) rather than a local path."""
    return isinstance(where, str) and _SCHEME.match(where) is not None


def check_uri(where: str) -> str:
    """The scheme of the URI ``where`` (``file`` or one of ``REMOTE_SCHEMES``), checked without any network call;
    ``ValueError`` naming ``where`` for another scheme or a malformed URI (``s3:/bucket``, ``s3:///key``)."""
    match = _SCHEME.match(where)
    if match is None:
        raise ValueError(f"{where!r} is not a URI")
    scheme = match.group(1).lower()
    if scheme == "file":
        if not where.startswith("file://"):
            raise ValueError(f"malformed file URI {where!r}: write file:///absolute/path or a plain path")
        return scheme
    if scheme not in REMOTE_SCHEMES:
        raise ValueError(f"unsupported URI {where!r}: data can live in a local folder or at s3://BUCKET/PREFIX or "
                         f"gs://BUCKET/PREFIX")
    rest = where[len(scheme) + 1:]
    if not rest.startswith("//") or not rest[2:].split("/")[0]:
        raise ValueError(f"malformed object-store URI {where!r}: write {scheme}://BUCKET/PREFIX")
    return scheme


def locate(where: str | Path) -> Location:
    """The ``Location`` of a local path (made absolute) or an ``s3://`` / ``gs://`` URI.

    Raises ``ValueError`` for any other scheme, for a malformed object-store URI (``s3:/bucket``, no bucket).
    """
    if isinstance(where, Path) or not is_uri(where):
        path = Path(where).expanduser().absolute()
        return Location(str(path), pafs.LocalFileSystem(), str(path))
    if check_uri(where) == "file":
        return locate(Path(where[len("file://"):]))
    uri = where.rstrip("/")
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as error:
        raise StorageError(f"cannot open {uri!r}: {error}") from error
    return Location(uri, filesystem, path.rstrip("/"))


def check_reachable(location: Location) -> None:
    """Fail before any work starts when ``location``'s bucket cannot be read with this environment's credentials
    (missing or wrong credentials, unknown bucket, unreachable endpoint): ``StorageError`` naming the URI.
    A local location always passes."""
    if not location.is_remote:
        return
    bucket = location.path.split("/")[0]
    try:
        info = location.filesystem.get_file_info(bucket)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{location.uri}: bucket {bucket!r} does not exist or is not visible with the "
                               "credentials of this environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                               "AWS_ENDPOINT_URL for an S3-compatible store)")
        location.filesystem.get_file_info(pafs.FileSelector(location.path, allow_not_found=True, recursive=False))
    except StorageError:
        raise
    except OSError as error:
        raise StorageError(f"cannot read {location.uri}: {error} (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                           "and AWS_ENDPOINT_URL)") from error


def is_file(location: Location) -> bool:
    return location.filesystem.get_file_info(location.path).type == pafs.FileType.File


def list_names(location: Location) -> list[str]:
    """Names (relative paths) of every file under the folder ``location``; empty when it does not exist."""
    selector = pafs.FileSelector(location.path, allow_not_found=True, recursive=True)
    prefix = location.path.rstrip("/") + "/"
    return sorted(info.path[len(prefix):] for info in location.filesystem.get_file_info(selector)
                  if info.type == pafs.FileType.File)


def read_text(location: Location) -> str:
    with location.filesystem.open_input_stream(location.path) as stream:
        return stream.read().decode()


def write_text(location: Location, text: str) -> None:
    """Write one object/file in a single put (on an object store the object appears whole or not at all)."""
    with location.filesystem.open_output_stream(location.path) as stream:
        stream.write(text.encode())


def delete_folder(location: Location) -> None:
    """Delete the folder ``location`` and everything under it (nothing when it does not exist)."""
    if location.filesystem.get_file_info(location.path).type != pafs.FileType.NotFound:
        location.filesystem.delete_dir(location.path)
