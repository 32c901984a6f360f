"""Local paths and object-store URIs (s3://, gs://, file://) alike, through pyarrow's filesystems.

On a cluster the nodes share files through an object store: every job reads its inputs and the model from, and
writes the store and its outputs to, either kind of location. Folders that libraries want on a local disk (a
model for torch, a report for matplotlib) are staged: fetched into, or written in, a local folder and copied.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager, suppress
from typing import BinaryIO, Iterator, Optional, Union

import pyarrow.fs as pafs

# the model's metadata goes last: a reader that finds model.json finds the weights it describes
LAST_FILES = ("model.json",)
COPY_CHUNK = 1 << 20


def is_uri(location: str) -> bool:
    return "://" in location


def absolute_uri(location: str) -> str:
    """A local path made absolute (Ray workers do not share the driver's working directory); URIs unchanged."""
    return location if is_uri(location) else os.path.abspath(location)


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and path for a local path or a URI (s3://, gs://, file://)."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    return pafs.FileSystem.from_uri(location)


# ---------- file names that are not UTF-8 ----------
# Python keeps the odd bytes of such a name as surrogate escapes (\udc80-\udcff), which UTF-8 text refuses: Arrow
# strings (every Ray Data block, the store, Parquet). Between processes the name travels as `to_wire` spells it, NUL
# + the byte's character (reversible: no path or archive member name contains NUL); an output that holds only UTF-8
# shows it as `utf8_name` spells it, `\xNN`; a CSV keeps the original bytes (errors="surrogateescape").
_SURROGATE = re.compile("[\udc80-\udcff]")
_ESCAPED = re.compile("\x00(.)", re.S)


def to_wire(text: Optional[str]) -> Optional[str]:
    return None if text is None else _SURROGATE.sub(lambda m: "\x00" + chr(ord(m.group()) - 0xDC00), text)


def from_wire(text: Optional[str]) -> Optional[str]:
    return None if text is None else _ESCAPED.sub(lambda m: chr(0xDC00 + ord(m.group(1))), text)


def utf8_name(name: Union[str, bytes]) -> str:
    """A name (text with surrogate escapes, or bytes) with its bytes that are not UTF-8 spelled `\\xNN`."""
    raw = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
    return raw.decode("utf-8", "backslashreplace")


def _join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def hidden_temp(path: str) -> str:
    """A hidden temporary name beside `path` (`.<name>.<random>.tmp`), unique to its writer; readers skip it."""
    parent, sep, name = path.rpartition("/")
    return f"{parent}{sep}.{name}.{uuid.uuid4().hex}.tmp"


def is_hidden_temp(name: str, of: str = "") -> bool:
    """Whether a file name is a hidden temporary (of the file named `of`, when given) that a killed writer left."""
    return name.startswith(f".{of}." if of else ".") and name.endswith(".tmp")


@contextmanager
def atomic_output(path: str, fs: Optional[pafs.FileSystem] = None) -> Iterator[str]:
    """A hidden temporary name beside `path` (local, or in `fs`) to write: it replaces `path` when the block
    succeeds and is removed when it fails, so readers see the old file or the new one, never half of one."""
    local = fs is None or isinstance(fs, pafs.LocalFileSystem)
    tmp = hidden_temp(path)
    try:
        yield tmp
        if local:
            os.replace(tmp, path)
        else:
            fs.move(tmp, path)
    except BaseException:
        with suppress(OSError):  # the block failed before creating it
            if local:
                os.remove(tmp)
            else:
                fs.delete_file(tmp)
        raise


def write_atomic(fs: pafs.FileSystem, path: str, source: Union[bytes, BinaryIO]) -> None:
    """Write bytes (or stream a binary file) to `path` in `fs` atomically (see atomic_output), creating its folder."""
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    with atomic_output(path, fs) as tmp, fs.open_output_stream(tmp) as out:
        if isinstance(source, bytes):
            out.write(source)
        else:
            shutil.copyfileobj(source, out, COPY_CHUNK)


def remove_leftovers(path: str) -> None:
    """Delete the hidden temporaries that killed writers of the local file `path` left beside it."""
    folder, name = os.path.split(path)
    for leftover in os.listdir(folder or ".") if os.path.isdir(folder or ".") else []:
        if is_hidden_temp(leftover, of=name):
            with suppress(FileNotFoundError):  # another run removed it first
                os.remove(os.path.join(folder, leftover))


def put_file(local_path: str, location: str) -> None:
    """Copy a finished local file to a path or URI, atomically."""
    fs, path = filesystem(location)
    with open(local_path, "rb") as f:
        write_atomic(fs, path, f)


def kind(location: str) -> pafs.FileType:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type


def exists(location: str) -> bool:
    return kind(location) != pafs.FileType.NotFound


def list_files(location: str) -> list[str]:
    """Every file under a folder or prefix, as paths or URIs of the same scheme (sorted); hidden names are skipped
    and links to folders are not followed (no loops)."""
    if not is_uri(location):
        # os.walk rather than pyarrow: it keeps names that are not UTF-8, and lists links to files (broken ones too)
        found = []
        for folder, subfolders, names in os.walk(location):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            found += [os.path.join(folder, n) for n in names if not n.startswith(".")]
        return sorted(found)
    fs, root = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    rel = lambda p: p[len(root.rstrip("/")) + 1:]
    return sorted(_join(location, rel(i.path)) for i in infos if i.type == pafs.FileType.File
                  and not any(part.startswith(".") for part in rel(i.path).split("/")))


def open_input(location: str):
    """A seekable binary file for a path or URI (soundfile reads from it)."""
    fs, path = filesystem(location)
    return fs.open_input_file(path)


def opener(location: str):
    """What audio.decode reads for a path or URI: a local path as it is, for a URI a function that opens it."""
    return functools.partial(open_input, location) if is_uri(location) else location


_fetched: dict[str, str] = {}


def local_folder(location: str) -> str:
    """A local folder with the files of `location`: the path itself, or a per-process copy of a URI folder's
    top-level files (a model's; not the training checkpoints and per-stage copies in its subfolders)."""
    if not is_uri(location):
        return location
    if location not in _fetched:
        fs, path = filesystem(location)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"{location}: no such folder")
        dest = tempfile.mkdtemp(prefix="langid-" + hashlib.sha1(location.encode()).hexdigest()[:8] + "-")
        for info in fs.get_file_info(pafs.FileSelector(path)):
            if info.type == pafs.FileType.File:
                pafs.copy_files(info.path, os.path.join(dest, info.base_name), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
        _fetched[location] = dest
    return _fetched[location]


def publish_folder(local: str, location: str) -> None:
    """Copy a finished local folder to a URI, file by file, metadata last; nothing to do for a local path."""
    if not is_uri(location) or os.path.abspath(local) == location:
        return
    fs, root = filesystem(location)
    # file by file through write_atomic, not pyarrow.fs.copy_files: that neither orders the files nor hides a
    # file while it is half-copied
    files = [os.path.relpath(p, local) for p in list_files(local)]
    for rel in sorted(files, key=lambda r: (os.path.basename(r) in LAST_FILES, r)):
        with open(os.path.join(local, rel), "rb") as f:
            write_atomic(fs, _join(root, rel.replace(os.sep, "/")), f)


class StagedFolder:
    """A local folder to write into, published to `location` on success: `with StagedFolder(uri) as local: ...`."""

    def __init__(self, location: str):
        self.location = location
        self.local: Optional[str] = None

    def __enter__(self) -> str:
        if is_uri(self.location):
            self.local = tempfile.mkdtemp(prefix="langid-out-")
        else:
            self.local = os.path.abspath(self.location)
            os.makedirs(self.local, exist_ok=True)
        return self.local

    def __exit__(self, exc_type, *exc) -> None:
        if is_uri(self.location):
            try:
                if exc_type is None:
                    publish_folder(self.local, self.location)
            finally:
                shutil.rmtree(self.local, ignore_errors=True)


def staging_path(location: str, name: str) -> str:
    """A stable local path standing for a URI output while a job writes it (so a rerun finds what it wrote)."""
    root = os.environ.get("LANGID_STAGING") or os.path.join(os.path.expanduser("~"), ".cache", "langid", "staging")
    folder = os.path.join(root, hashlib.sha1(location.encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)
