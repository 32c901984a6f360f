"""The preprocessing job: audio files -> log-mel windows in a Parquet store (and PNGs), on Ray Data."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from langid.audio import AudioError, load_audio
from langid.config import FeatureConfig
from langid.features import file_flags, flagged_window_features, to_png
from langid.sources import ManifestOptions, assign_splits, find_sources
from langid.store import ERRORS, WINDOWS, Store, shard_id
from langid.uris import absolute_uri, write_atomic

FILE_KEYS = ("path", "language", "split", "recording_id", "speaker", "gender", "fragment", "augmentation",
             "augmentation_index")


def process_file(record: dict, cfg: FeatureConfig, max_seconds: float = 4 * 3600.0):
    """(window rows, None) for a usable file, ([], reason) for one that is not."""
    if record.get("error"):
        return [], record["error"]
    try:
        path = os.fsdecode(record["source"]) if record.get("source") else record["path"]
        audio = load_audio(path, cfg.sample_rate, max_seconds=max_seconds)
    except AudioError as e:
        return [], str(e)
    except MemoryError:
        return [], "too large to decode in memory"
    base = {k: record.get(k) for k in FILE_KEYS}
    fflags = file_flags(audio.duration, audio.rms_dbfs, audio.peak_dbfs, cfg)
    rows = []
    try:
        specs, starts, wflags = flagged_window_features(audio.samples, cfg)
    except AudioError as e:
        return [], str(e)
    for i, (start, spec, flags) in enumerate(zip(starts, specs, wflags)):
        rows.append({
            **base,
            "window_index": i,
            "window_start": float(start),
            "duration": audio.duration,
            "source_sample_rate": audio.source_sample_rate,
            "source_channels": audio.source_channels,
            "quality_flags": ",".join(dict.fromkeys(fflags + flags)),
            "n_mels": spec.shape[0],
            "n_frames": spec.shape[1],
            "logmel": spec.ravel(),
        })
    return rows, None


def process_batch(batch: pa.Table, store_uri: str, cfg: FeatureConfig, png: bool, max_seconds: float) -> pa.Table:
    """Ray Data task: compute one batch of files, write it as one shard, return a line per file.

    Errors are written before windows: a task killed between the two leaves its ok files
    undone (redone on resume) and never a file recorded twice.
    """
    store = Store(store_uri)
    records = batch.to_pylist()
    sid = shard_id(r["path"] for r in records)
    window_rows, error_rows, summary = [], [], []
    for rec in records:
        rows, err = process_file(rec, cfg, max_seconds)
        if err is not None:
            error_rows.append({**{k: rec.get(k) for k in FILE_KEYS}, "error": err})
        window_rows.extend(rows)
        summary.append({"path": rec["path"], "ok": err is None, "windows": len(rows), "error": err or "",
                        "quality_flags": rows[0]["quality_flags"] if rows else ""})
    if png:
        for r in window_rows:
            spec = r["logmel"].reshape(r["n_mels"], r["n_frames"])
            target = store.png_path(r["split"], r["language"], r["path"], r["window_index"])
            write_atomic(store.fs, target, to_png(spec))
    if error_rows:
        store.write_shard(ERRORS, pa.Table.from_pylist(error_rows), sid)
    if window_rows:
        store.write_shard(WINDOWS, _window_table(window_rows), sid)
    return pa.Table.from_pylist(summary)


def _window_table(rows: list[dict]) -> pa.Table:
    cols = {k: [r[k] for r in rows] for k in rows[0] if k != "logmel"}
    flat = np.concatenate([r["logmel"] for r in rows]).astype(np.float32, copy=False)
    offsets = np.concatenate([[0], np.cumsum([len(r["logmel"]) for r in rows])]).astype(np.int32)
    cols["logmel"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    return pa.table(cols)


def utf8_record(record: dict) -> dict:
    """The record with text Arrow can hold: a name's bytes that are not UTF-8 (which Python keeps as surrogate
    escapes) are spelled `\\xNN` in the store; `source` keeps the real path to open."""
    out = {k: v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if isinstance(v, str) else v
           for k, v in record.items()}
    out["source"] = os.fsencode(record["path"])
    return out


MIN_FILES_PER_TASK = 4


def files_per_task(n_files: int, batch_size: int, cpus: int) -> int:
    """Files per task (and shard): up to batch_size, fewer so that every CPU gets about four tasks (no worker
    idles through a long last round), but not below a few files (tiny shards cost more than they save)."""
    spread = math.ceil(n_files / (4 * max(1, cpus)))
    return max(1, min(batch_size, max(spread, MIN_FILES_PER_TASK)))


@dataclass
class PreprocessResult:
    store: str
    files_seen: int
    skipped_done: int
    ok: int = 0
    failed: int = 0
    windows: int = 0
    seconds: float = 0.0
    errors: list = field(default_factory=list)  # (path, reason) of this run's failures
    left_out: dict = field(default_factory=dict)  # label CSV rows that are no training data: reason -> count

    def summary(self) -> str:
        text = (f"{self.files_seen} files: {self.skipped_done} already in the store, {self.ok} ok "
                f"({self.windows} windows), {self.failed} failed, in {self.seconds:.1f} s. "
                f"Windows: {self.store}/windows, errors: {self.store}/errors")
        if self.left_out:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.left_out.items())
            text += f"\n{sum(self.left_out.values())} label rows left out: {reasons}"
        return text


def run_preprocess(
    input_path: str,
    output: str,
    cfg: FeatureConfig = FeatureConfig(),
    source_format: str = "auto",
    valid_fraction: float = 0.2,
    seed: int = 0,
    png: bool = False,
    batch_size: int = 32,
    num_cpus: float = 1.0,
    max_seconds: float = 4 * 3600.0,
    progress: bool = True,
    split: str | None = None,
    memory: int = 0,
    manifest: ManifestOptions = ManifestOptions(),
) -> PreprocessResult:
    """Discover, split, and compute every file not yet in the store; Ray must be initialised.

    `manifest` says which answers of a label CSV to keep and how to group files for the split.
    """
    import ray
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    output = absolute_uri(output)
    found = find_sources(input_path, source_format, manifest)
    records = [utf8_record(r) for r in found.records]
    if split is not None:  # a held-out set: every file gets this split
        records = [{**r, "split": split} for r in records]
    records = assign_splits(records, valid_fraction, seed)
    store = Store(output)
    store.init(cfg)
    done = store.done_paths()
    todo = [r for r in records if r["path"] not in done]
    result = PreprocessResult(store=output, files_seen=len(records), skipped_done=len(records) - len(todo),
                              left_out=found.left_out)
    if todo:
        batch_size = files_per_task(len(todo), batch_size, int(ray.cluster_resources().get("CPU", 1)))
        ds = ray.data.from_items(todo, override_num_blocks=math.ceil(len(todo) / batch_size))
        out = ds.map_batches(process_batch, fn_args=(output, cfg, png, max_seconds),
                             batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus,
                             **({"memory": memory} if memory else {}))
        with tqdm(total=len(todo), unit="file", desc="preprocess", disable=not progress) as bar:
            for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
                for row in batch.to_pylist():
                    if row["ok"]:
                        result.ok += 1
                        result.windows += row["windows"]
                    else:
                        result.failed += 1
                        result.errors.append((row["path"], row["error"]))
                bar.update(batch.num_rows)
    result.seconds = time.perf_counter() - t0
    return result
