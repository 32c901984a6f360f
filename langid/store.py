"""The spectrogram store: sharded Parquet tables (windows, errors) plus the feature configuration.

Layout of a store (a local folder or an object-store URI such as s3://bucket/store):
    feature_config.json         the FeatureConfig every shard was computed with
    windows/part-<id>.parquet   one row per window of every file that decoded
    errors/part-<id>.parquet    one row per file that could not be used, with the reason
    png/<split>/<lang>/*.png    spectrogram images, when asked for
A shard is written under a hidden temporary name and renamed into place, so readers (which skip
names starting with '.' and files not ending in .parquet) never see a half-written file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from langid.config import FeatureConfig
from langid.errors import UserError, one_line
from langid.sources import SourceFile
from langid.uris import _join, filesystem, is_hidden_temp, write_atomic

CONFIG_FILE = "feature_config.json"
CONFIG_KEY = b"langid.feature_config"
WINDOWS, ERRORS = "windows", "errors"

# a file's columns: the fields of its record, whole numbers (a Kaggle name's) as int32
FILE_FIELDS = [pa.field(f.name, pa.int32() if "int" in f.type else pa.string())
               for f in dataclasses.fields(SourceFile) if f.name != "error"]
WINDOW_SCHEMA = pa.schema(
    FILE_FIELDS
    + [
        pa.field("window_index", pa.int32()),
        pa.field("window_start", pa.float32()),
        pa.field("duration", pa.float32()),
        pa.field("source_sample_rate", pa.int32()),
        pa.field("source_channels", pa.int32()),
        pa.field("quality_flags", pa.string()),
        pa.field("n_mels", pa.int32()),
        pa.field("n_frames", pa.int32()),
        pa.field("logmel", pa.list_(pa.float32())),
    ]
)
ERROR_SCHEMA = pa.schema(FILE_FIELDS + [pa.field("error", pa.string())])
# Spectrograms are float noise to a compressor (zstd took 4% off them) and dictionary encoding only wastes a try on
# them; both, with min/max statistics nobody filters on, were most of a shard's write time: they are stored plain.
_SMALL_COLUMNS = [f.name for f in WINDOW_SCHEMA if f.name != "logmel"]
WRITE_OPTIONS = {
    WINDOWS: dict(compression={**dict.fromkeys(_SMALL_COLUMNS, "zstd"), "logmel": "none"},
                  use_dictionary=_SMALL_COLUMNS, write_statistics=_SMALL_COLUMNS),
    ERRORS: dict(compression="zstd"),
}


class StoreError(UserError):
    """A store that cannot be used as asked (wrong configuration, missing, unreadable)."""


def shard_id(paths: Iterable[str]) -> str:
    """Deterministic id for a batch of input files, so a retried task overwrites its own shard."""
    h = hashlib.sha1()
    for p in sorted(paths):
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:20]


class Store:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = filesystem(uri)
        self._config_json: Optional[bytes] = None

    def path(self, *parts: str) -> str:
        return _join(self.root, *parts)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path(CONFIG_FILE)).type == pafs.FileType.File

    def read_config(self) -> FeatureConfig:
        if not self.exists():
            raise StoreError(f"{self.uri}: not a langid store (no {CONFIG_FILE}); run jobs/preprocess.py first")
        with self.fs.open_input_stream(self.path(CONFIG_FILE)) as f:
            text = f.read()
        try:
            return FeatureConfig.from_json(text, complete=True)
        except ValueError as e:  # not JSON, or bad values
            raise StoreError(f"{self.path(CONFIG_FILE)}: bad feature configuration ({one_line(e)})") from None

    def init(self, cfg: FeatureConfig) -> None:
        """Create the store, or check that an existing one was built with the same features."""
        if self.exists():
            old = self.read_config()
            if old != cfg:
                raise StoreError(
                    f"{self.uri} was built with other features ({_diff(old, cfg)}); use a new --output or the same settings"
                )
            return
        write_atomic(self.fs, self.path(CONFIG_FILE), (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())

    def shards(self, table: str) -> list[str]:
        sel = pafs.FileSelector(self.path(table), allow_not_found=True)
        return sorted(
            i.path for i in self.fs.get_file_info(sel)
            if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_"))
        )

    def write_shard(self, table: str, rows: pa.Table, sid: str) -> str:
        schema = WINDOW_SCHEMA if table == WINDOWS else ERROR_SCHEMA
        if not rows.schema.equals(schema):
            rows = rows.cast(schema)
        rows = rows.replace_schema_metadata({CONFIG_KEY: self.read_config_json()})
        sink = pa.BufferOutputStream()
        pq.write_table(rows, sink, **WRITE_OPTIONS[table])
        target = self.path(table, f"part-{sid}.parquet")
        write_atomic(self.fs, target, sink.getvalue().to_pybytes())
        return target

    def read_config_json(self) -> bytes:
        if self._config_json is None:  # a task writes two shards with it: one read of the file
            with self.fs.open_input_stream(self.path(CONFIG_FILE)) as f:
                self._config_json = f.read()
        return self._config_json

    def read(self, table: str = WINDOWS, columns: Optional[list[str]] = None, filters=None) -> pa.Table:
        """The whole table (all shards) as one Arrow table; empty with the right schema when none."""
        schema = WINDOW_SCHEMA if table == WINDOWS else ERROR_SCHEMA
        files = self.shards(table)
        if not files:
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        import pyarrow.dataset as ds

        dataset = ds.dataset(files, schema=schema, filesystem=self.fs, format="parquet")
        return dataset.to_table(columns=columns, filter=filters)

    def remove_leftovers(self) -> int:
        """Delete the hidden temporary files (see uris.hidden_temp) that writers killed before their rename left in
        the store; returns how many. Run before a job's tasks start: none is writing then."""
        sel = pafs.FileSelector(self.root, allow_not_found=True, recursive=True)
        gone = 0
        for info in self.fs.get_file_info(sel):
            if info.type == pafs.FileType.File and is_hidden_temp(info.base_name):
                self.fs.delete_file(info.path)
                gone += 1
        return gone

    def done_paths(self) -> set[str]:
        """Input files that already have their record (ok or error) in the store."""
        done = set()
        for table in (WINDOWS, ERRORS):
            done.update(self.read(table, columns=["path"]).column("path").to_pylist())
        return done

    def counts(self) -> dict:
        w = self.read(WINDOWS, columns=["path", "split", "language"])
        e = self.read(ERRORS, columns=["path"])
        files = w.group_by(["path", "split", "language"]).aggregate([]) if w.num_rows else w
        by = {}
        for split, lang in zip(files.column("split").to_pylist(), files.column("language").to_pylist()):
            by.setdefault(split, {}).setdefault(lang, 0)
            by[split][lang] += 1
        return {"files_ok": files.num_rows, "files_failed": e.num_rows, "windows": w.num_rows, "by_split": by}

    def png_path(self, split: str, language: str, source_path: str, window_index: int) -> str:
        stem = os.path.splitext(os.path.basename(source_path))[0]
        tag = hashlib.sha1(source_path.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        return self.path("png", split or "none", language or "none", f"{stem}-{tag}.w{window_index:03d}.png")


def _diff(a: FeatureConfig, b: FeatureConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}: {da[k]} vs {db[k]}" for k in da if da[k] != db[k])


def logmel_matrix(table: pa.Table) -> np.ndarray:
    """(rows, n_mels, n_frames) float32 array from a windows table."""
    if table.num_rows == 0:
        return np.zeros((0, 0, 0), np.float32)
    n_mels = table.column("n_mels")[0].as_py()
    n_frames = table.column("n_frames")[0].as_py()
    flat = table.column("logmel").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(table.num_rows, n_mels, n_frames).astype(np.float32, copy=False)
