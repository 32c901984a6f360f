"""What to label: a directory, a glob, a file list, or a tar/zip archive read member by member.

Archive members are read into memory and never written to disk, so a member named `../x` or `/etc/x`
cannot reach anything outside the archive: its name is only a label in the output.
"""
from __future__ import annotations

import os
import pathlib
import tarfile
import zipfile
from dataclasses import dataclass
from typing import Iterator, Optional

from pyarrow.fs import FileType

from langid.audio import AUDIO_EXTENSIONS
from langid.errors import BadValue, one_line
from langid.uris import is_uri, kind, list_files

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")
MEMBER_SEP = "::"  # archive.tar::member/name.flac
MAX_MEMBER_BYTES = 2 << 30


@dataclass
class Item:
    """One input file: its key in the output, plus either a path to read or the member's bytes."""

    key: str
    path: Optional[str] = None
    data: Optional[bytes] = None
    error: Optional[str] = None


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES) and os.path.isfile(path)


def _wanted(name: str, all_files: bool) -> bool:
    return all_files or name.lower().endswith(AUDIO_EXTENSIONS)


def list_inputs(spec: str, all_files: bool = False) -> tuple[list[str], str]:
    """(paths, kind) for a directory, glob, file list (@list.txt or .txt/.lst), archive or single file.

    A URI (s3://bucket/prefix, gs://..., file://...) names a folder (every file under it) or one file.
    """
    if is_uri(spec):
        found = kind(spec)
        if found == FileType.Directory:
            return [p for p in list_files(spec) if _wanted(p, all_files)], "directory"
        if found == FileType.File:
            if spec.lower().endswith(ARCHIVE_SUFFIXES):
                raise BadValue(f"{spec}: archives are read from a local path; copy it to the node first")
            return [spec], "file"
        raise FileNotFoundError(f"{spec}: no such file or folder")
    if any(c in spec for c in "*?[") and not os.path.exists(spec):
        # every match but folders, as in a directory: a broken link or a pipe gets its error row, not silence
        return sorted(p for p in _glob(spec) if not os.path.isdir(p) and _wanted(p, all_files)), "glob"
    if spec.startswith("@") or (os.path.isfile(spec) and spec.lower().endswith((".txt", ".lst"))):
        listfile = spec[1:] if spec.startswith("@") else spec
        with open(listfile, encoding="utf-8", errors="surrogateescape") as f:  # names need not be UTF-8
            return [line.rstrip("\r\n") for line in f if line.strip()], "list"
    if os.path.isdir(spec):
        return [p for p in list_files(spec) if _wanted(p, all_files)], "directory"
    if is_archive(spec):
        return [spec], "archive"
    if os.path.isfile(spec):
        return [spec], "file"
    raise FileNotFoundError(f"{spec}: no such file, directory, glob match or archive")


def _glob(spec: str) -> list[str]:
    """Matches of a glob pattern; `**` does not descend into symlinked folders (as the directory walk), since
    `glob.glob` would follow a link to a parent folder round and round, exponentially with two such links."""
    parts = spec.split(os.sep)
    first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    root = os.sep.join(parts[:first]) or (os.sep if spec.startswith(os.sep) else ".")
    pattern = os.sep.join(parts[first:] + (["*"] if parts[-1] == "**" else []))
    return [str(p) for p in pathlib.Path(root).glob(pattern)]


def iter_archive(path: str, all_files: bool = False, name: Optional[str] = None) -> Iterator[Item]:
    """Members of a tar or zip archive in order, each read whole into memory (streaming for .tar.gz).

    Keys are `name::member`; `name` (default: `path`) is the archive as the user gave it, while `path`
    is where to open it (absolute in Ray workers, whose working directory is not the driver's).
    """
    name = path if name is None else name
    try:
        if path.lower().endswith(".zip"):
            yield from _iter_zip(path, all_files, name)
        else:
            yield from _iter_tar(path, all_files, name)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        yield Item(key=f"{name}{MEMBER_SEP}", error=f"unreadable archive ({one_line(e)})")


def _iter_tar(path: str, all_files: bool, name: str) -> Iterator[Item]:
    with tarfile.open(path, mode="r|*") as tar:  # a stream: one pass, no seeking back
        for m in tar:
            if m.isdir() or not _wanted(m.name, all_files):
                continue
            key = f"{name}{MEMBER_SEP}{m.name}"
            problem = _member_problem(m.name, m.size, m.issym() or m.islnk(), m.isfile())
            if problem:
                yield Item(key=key, error=problem)
            else:
                f = tar.extractfile(m)
                yield Item(key=key, data=f.read() if f else b"")


def _member_problem(name: str, size: int, is_link: bool, is_file: bool) -> Optional[str]:
    """Why an archive member is not read, or None: links are never followed, nothing huge or nested is opened."""
    if is_link:
        return "archive member is a link; links are not followed"
    if not is_file:
        return "archive member is not a regular file"
    if size > MAX_MEMBER_BYTES:
        return f"archive member larger than {MAX_MEMBER_BYTES >> 30} GiB"
    if name.lower().endswith(ARCHIVE_SUFFIXES):
        return "nested archive; extract it or label it on its own"
    return None


def _iter_zip(path: str, all_files: bool, name: str) -> Iterator[Item]:
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if info.is_dir() or not _wanted(info.filename, all_files):
                continue
            key = f"{name}{MEMBER_SEP}{info.filename}"
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            problem = _member_problem(info.filename, info.file_size, is_link, True)
            if problem:
                yield Item(key=key, error=problem)
            else:
                try:
                    yield Item(key=key, data=z.read(info))
                except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
                    yield Item(key=key, error=f"unreadable archive member ({one_line(e)})")
