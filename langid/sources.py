"""Find labelled audio: the Kaggle layout, folder-per-language trees and CSV/TSV manifests (`langid label` CSVs too).

Every source yields the same record per file (SourceFile), so one job serves all.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from dataclasses import dataclass, field, replace
from typing import Optional

from pyarrow.fs import FileType

from langid.audio import AUDIO_EXTENSIONS
from langid.errors import BadValue
from langid.inputs import ARCHIVE_SUFFIXES, MEMBER_SEP
from langid.uris import absolute_uri, is_uri, kind, list_files, open_input

KAGGLE_PATTERN = "lang_gender_<32-hex recording id>.fragmentN[.speedK|.pitchK|.noiseK].flac"
# numbers are up to 9 ASCII digits (the store keeps them as int32); \Z, since `$` also accepts a final newline
KAGGLE_RE = re.compile(
    r"^(?P<language>[a-z]{2,3})_(?P<gender>[mf])_(?P<recording_id>[0-9a-f]{32})"
    r"\.fragment(?P<fragment>[0-9]{1,9})"
    r"(?:\.(?P<augmentation>speed|pitch|noise)(?P<augmentation_index>[0-9]{1,9}))?"
    r"\.flac\Z"
)
SPLITS = ("train", "valid", "test")


class BadName(ValueError):
    """A file name that does not follow the Kaggle pattern."""


@dataclass
class SourceFile:
    """One input file and what its name, folders or manifest row tell: the record the store keeps of it."""

    path: str
    language: Optional[str] = None
    split: Optional[str] = None
    recording_id: Optional[str] = None
    speaker: Optional[str] = None
    gender: Optional[str] = None
    fragment: Optional[int] = None
    augmentation: Optional[str] = None
    augmentation_index: Optional[int] = None
    error: Optional[str] = None  # set when the file cannot even be described (bad name, bad manifest row)


def parse_kaggle_name(name: str) -> dict:
    """Parse `en_m_<id>.fragment3.speed2.flac` into its fields; raises BadName naming the pattern."""
    base = os.path.basename(name)
    m = KAGGLE_RE.match(base)
    if not m:
        raise BadName(f"{name}: name does not match {KAGGLE_PATTERN}")
    d = m.groupdict()
    return {
        "language": d["language"],
        "gender": d["gender"],
        "recording_id": d["recording_id"],
        "fragment": int(d["fragment"]),
        "augmentation": d["augmentation"] or "original",
        "augmentation_index": int(d["augmentation_index"]) if d["augmentation_index"] else None,
    }


def _walk(root: str) -> list[str]:
    """All files under root with an audio extension, sorted (uris.list_files)."""
    return [p for p in list_files(root) if p.lower().endswith(AUDIO_EXTENSIONS)]


def _relative(path: str, root: str) -> list[str]:
    """The parts of `path` below `root` (paths or URIs)."""
    if is_uri(root):
        return path[len(root.rstrip("/")) + 1:].split("/")
    return os.path.relpath(path, root).split(os.sep)


def _split_from_path(parts: list[str]) -> Optional[str]:
    """'test' when the nearest ancestor named train or test is test (Kaggle's test/test, test/de).

    Training files get no split here: the grouped split decides between train and valid.
    """
    for part in reversed(parts[:-1]):
        if part in ("train", "test"):
            return "test" if part == "test" else None
    return None


def scan_kaggle(root: str) -> list[SourceFile]:
    """Records for every audio file under root; names off the pattern become error records."""
    root = absolute_uri(root).rstrip("/")
    records = []
    for path in _walk(root):
        rec = SourceFile(path=path, split=_split_from_path(_relative(path, os.path.dirname(root))))
        try:
            fields = parse_kaggle_name(path)
        except BadName:
            rec.error = f"name does not match {KAGGLE_PATTERN}"
        else:
            for k, v in fields.items():
                setattr(rec, k, v)
            rec.speaker = rec.recording_id
        records.append(rec)
    return records


def scan_folders(root: str) -> list[SourceFile]:
    """`root/<lang>/**/*.<ext>`: the first folder is the language, the second (if any) the speaker."""
    root = absolute_uri(root).rstrip("/")
    records = []
    for path in _walk(root):
        parts = _relative(path, root)
        if len(parts) < 2:
            records.append(SourceFile(path=path, error="file is not inside a language folder (root/<lang>/...)"))
            continue
        language = parts[0]
        speaker = parts[1] if len(parts) > 2 else os.path.splitext(parts[-1])[0]
        records.append(
            SourceFile(path=path, language=language, speaker=f"{language}/{speaker}", recording_id=f"{language}/{speaker}",
                       split=_split_from_path(_relative(path, os.path.dirname(root))))
        )
    return records


GROUP_BY = ("speaker", "folder", "file")
# what `langid label` answers below its --min-confidence; langid.inference.UNKNOWN, not imported (it loads torch)
UNKNOWN = "unknown"
# why a label CSV row is no training data, in the order a summary names them
LABEL_FAILED, ANSWERED_UNKNOWN, LOW_CONFIDENCE = "labeling failed", "answered unknown", "below the minimum confidence"
LEFT_OUT_REASONS = (LABEL_FAILED, ANSWERED_UNKNOWN, LOW_CONFIDENCE)


@dataclass(frozen=True)
class ManifestOptions:
    """Which answers of a label CSV to train on, and what keeps files together on one side of the split."""

    min_confidence: float = 0.0
    group_by: str = "speaker"  # speaker: the speaker column, else each file alone; folder: the file's folder

    def __post_init__(self):
        if not 0 <= self.min_confidence <= 1:
            raise BadValue(f"--min-confidence must be in [0, 1], got {self.min_confidence}")
        if self.group_by not in GROUP_BY:
            raise BadValue(f"--group-by must be one of {', '.join(GROUP_BY)}, got {self.group_by!r}")


@dataclass
class Sources:
    """An input's records, and how many label CSV rows were left out of them, by reason."""

    records: list[SourceFile]
    left_out: dict = field(default_factory=dict)


def _open_text(path: str):
    # surrogate escapes: `langid label` writes names that are not UTF-8 as their bytes, and they must open again
    if is_uri(path):
        return io.TextIOWrapper(open_input(path), encoding="utf-8", errors="surrogateescape", newline="")
    return open(path, newline="", encoding="utf-8", errors="surrogateescape")


def _is_archive_member(p: str) -> bool:
    archive, sep, _ = p.partition(MEMBER_SEP)
    return bool(sep) and archive.lower().endswith(ARCHIVE_SUFFIXES)


def _group(full: str, speaker: Optional[str], group_by: str) -> str:
    """The split group of a file: its speaker (else the file itself), its folder, or the file itself."""
    if group_by == "folder":
        return full.rsplit("/", 1)[0] if is_uri(full) else os.path.dirname(full)
    return speaker if group_by == "speaker" and speaker else full


def _left_out(row: dict, label_csv: bool, min_confidence: float) -> Optional[str]:
    """Why a row is no training data (one of LEFT_OUT_REASONS), or None; raises ValueError for a bad confidence."""
    if label_csv and (row.get("status") or "").strip() != "ok":
        return LABEL_FAILED
    if label_csv and (row.get("language") or "").strip() in ("", UNKNOWN):
        return ANSWERED_UNKNOWN
    if min_confidence > 0:
        text = (row.get("confidence") or "").strip()
        try:
            confidence = float(text)
        except ValueError:
            raise ValueError(f"confidence {text!r} is not a number") from None
        if not confidence >= min_confidence:  # NaN too
            return LOW_CONFIDENCE
    return None


def _record(row: dict, i: int, p: str, base: str, group_by: str) -> SourceFile:
    """One manifest row (line i) as a record; a row that cannot be used gets its reason in `error`."""
    full = p if (os.path.isabs(p) or is_uri(p)) else f"{base}/{p}" if is_uri(base) else os.path.join(base, p)
    rec = SourceFile(path=full, language=(row.get("language") or "").strip() or None)
    split = (row.get("split") or "").strip() or None
    if split is not None and split not in SPLITS:
        rec.error = f"manifest line {i}: split {split!r} is not one of {', '.join(SPLITS)}"
    rec.split = split
    rec.speaker = rec.recording_id = _group(full, (row.get("speaker") or "").strip() or None, group_by)
    if not p:
        rec.error = f"manifest line {i}: empty path"
    elif _is_archive_member(p):
        rec.error = (f"manifest line {i}: archive members cannot be preprocessed from a manifest; "
                     f"extract the archive first")
    elif rec.language is None:
        rec.error = f"manifest line {i}: empty language"
    return rec


def load_manifest(path: str, opts: ManifestOptions = ManifestOptions()) -> Sources:
    """A CSV/TSV manifest (columns path or file, language, optional split, speaker) or a `langid label` CSV.

    Relative paths resolve from the manifest's folder. A label CSV keys files as given to `label`, relative to
    where it ran: write labels.csv there (the usual case) or fix the paths. Of a label CSV (it has status and
    confidence columns) only answered rows at or above opts.min_confidence become records; the rest are counted.
    """
    base = os.path.dirname(absolute_uri(path))
    with _open_text(path) as f:
        sample = f.read(4096)
        f.seek(0)
        delimiter = "\t" if path.lower().endswith(".tsv") or sample.count("\t") > sample.count(",") else ","
        reader = csv.DictReader(f, delimiter=delimiter)
        cols = set(reader.fieldnames or [])
        path_col = "path" if "path" in cols else "file"
        if not {path_col, "language"} <= cols:
            raise BadValue(f"{path}: manifest needs columns 'path' (or 'file') and 'language', found {sorted(cols)}")
        if opts.min_confidence > 0 and "confidence" not in cols:
            raise BadValue(f"{path}: --min-confidence needs a 'confidence' column (a CSV written by `langid label`); "
                             f"drop the flag for this manifest")
        label_csv = {"status", "confidence"} <= cols
        records, counts = [], dict.fromkeys(LEFT_OUT_REASONS, 0)
        for i, row in enumerate(reader, start=2):
            p = (row.get(path_col) or "").strip()
            try:
                reason, problem = _left_out(row, label_csv, opts.min_confidence), None
            except ValueError as e:
                reason, problem = None, f"manifest line {i}: {e}"
            if reason is not None:
                counts[reason] += 1
                continue
            rec = _record(row, i, p, base, opts.group_by)
            rec.error = rec.error or problem
            records.append(rec)
    return Sources(records, {k: n for k, n in counts.items() if n})


def detect_format(input_path: str) -> str:
    found = kind(input_path)
    if found == FileType.File and input_path.lower().endswith((".csv", ".tsv")):
        return "manifest"
    if found != FileType.Directory:
        raise FileNotFoundError(f"{input_path}: no such directory or manifest file")
    if any(KAGGLE_RE.match(p.rsplit("/", 1)[-1]) for p in _walk(input_path)):
        return "kaggle"
    return "folders"


def find_sources(input_path: str, fmt: str = "auto", manifest: ManifestOptions = ManifestOptions()) -> Sources:
    """Records for a Kaggle tree, a folder-per-language tree or a manifest (`fmt` auto-detects), read with `manifest`."""
    fmt = detect_format(input_path) if fmt == "auto" else fmt
    scanners = {"kaggle": scan_kaggle, "folders": scan_folders}
    if fmt == "manifest":
        return load_manifest(input_path, manifest)
    if fmt not in scanners:
        raise ValueError(f"unknown source format {fmt!r}: use auto, kaggle, folders or manifest")
    if manifest != ManifestOptions():
        raise BadValue(f"{input_path}: --min-confidence and --group-by apply to a CSV/TSV manifest, "
                         f"not a {fmt} tree; drop them")
    return Sources(scanners[fmt](input_path))


def _rank(seed: int, key: str) -> str:
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def assign_splits(records: list[SourceFile], valid_fraction: float = 0.2, seed: int = 0) -> list[SourceFile]:
    """Give records without a split 'train' or 'valid', grouped by recording so no group straddles both.

    A recording that already has a split somewhere (a manifest, Kaggle's test folder) gives it to all
    its records. The others are taken per language (a recording's first language), ordered by a
    seeded hash, and the first round(fraction * recordings) go to validation (at least one when a
    language has two or more): deterministic for a seed, and every language is validated.
    """
    if not 0 <= valid_fraction < 1:
        raise BadValue("valid_fraction must be in [0, 1)")
    fixed: dict = {}
    for r in records:
        if r.error is None and r.split is not None:
            fixed.setdefault(r.recording_id, r.split)
    owner: dict = {}  # recording -> the language it is balanced under
    for r in records:
        if r.error is None and r.recording_id not in fixed:
            owner.setdefault(r.recording_id, r.language)
    groups: dict[str, list] = {}
    for rid, language in owner.items():
        groups.setdefault(language, []).append(rid)
    chosen: dict = {}
    for ids in groups.values():
        ordered = sorted(ids, key=lambda g: _rank(seed, g))
        n = round(valid_fraction * len(ordered))
        if valid_fraction > 0 and len(ordered) >= 2:
            n = min(max(n, 1), len(ordered) - 1)
        chosen.update({g: ("valid" if i < n else "train") for i, g in enumerate(ordered)})

    def split_of(r: SourceFile) -> Optional[str]:
        if r.error is not None or r.split is not None:
            return r.split
        return fixed.get(r.recording_id) or chosen[r.recording_id]

    return [replace(r, split=split_of(r)) for r in records]  # copies: the caller's records stay as they were
