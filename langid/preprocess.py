"""The preprocessing job: audio files -> log-mel windows in a Parquet store (and PNGs), on Ray Data."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator

import numpy as np
import pyarrow as pa

from langid.audio import AudioError, load_audio
from langid.config import MAX_SECONDS, FeatureConfig
from langid.features import FeatureError, file_flags, flagged_window_features, to_png
from langid.poison import PROCESS_DIED, Attempts, crash_hook
from langid.sources import ManifestOptions, SourceFile, assign_splits, find_sources
from langid.store import ERROR_SCHEMA, ERRORS, FILE_FIELDS, WINDOW_SCHEMA, WINDOWS, Store, shard_id
from langid.uris import absolute_uri, from_wire, opener, to_wire, utf8_name, write_atomic

# the files a task computes: each one's record and `source`, the path to open (as uris.to_wire spells it)
WORK_SCHEMA = ERROR_SCHEMA.append(pa.field("source", pa.string()))


def work_table(files: list[tuple[SourceFile, str]]) -> pa.Table:
    """(record, path to open) of each file as a table of WORK_SCHEMA, for Ray Data."""
    return pa.Table.from_pylist([{**asdict(r), "source": to_wire(source)} for r, source in files], schema=WORK_SCHEMA)


def process_file(record: SourceFile, source: str, cfg: FeatureConfig, max_seconds: float = MAX_SECONDS):
    """(its windows as a record batch of WINDOW_SCHEMA, None) for a usable file, (None, reason) for one that is not;
    `source` is the path to open (`record.path` names the file as the store does).

    Columns are built whole (no dict per window): per-row Python objects cost more than the Parquet writing.
    """
    if record.error:
        return None, record.error
    try:
        crash_hook(source)
        audio = load_audio(opener(source), cfg.sample_rate, max_seconds=max_seconds)
    except AudioError as e:
        return None, str(e)
    except MemoryError:
        return None, "too large to decode in memory"
    fflags = file_flags(audio.duration, audio.rms_dbfs, audio.peak_dbfs, cfg)
    try:
        specs, starts, wflags = flagged_window_features(audio.samples, cfg)
    except FeatureError as e:
        return None, str(e)
    n, rows, cols = specs.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * (rows * cols), pa.int32())  # raises rather than wraps
    columns = {f.name: [getattr(record, f.name)] * n for f in FILE_FIELDS}
    columns.update(
        window_index=np.arange(n, dtype=np.int32),
        window_start=np.asarray(starts, np.float32),
        duration=[audio.duration] * n,
        source_sample_rate=[audio.source_sample_rate] * n,
        source_channels=[audio.source_channels] * n,
        quality_flags=[",".join(dict.fromkeys(fflags + f)) for f in wflags],
        n_mels=[rows] * n,
        n_frames=[cols] * n,
        logmel=pa.ListArray.from_arrays(offsets, pa.array(specs.astype(np.float32, copy=False).ravel())),
    )
    return pa.RecordBatch.from_pydict(columns, schema=WINDOW_SCHEMA), None


def process_batch(batch: pa.Table, store_uri: str, cfg: FeatureConfig, png: bool, max_seconds: float,
                  shard_files: int = 0, attempts: Attempts | None = None) -> pa.Table:
    """Ray Data task: compute a batch of files, write it as shards of `shard_files` files (0: one shard), return
    a line per file. A file whose decoding has killed its process too often (`attempts`) is recorded as an error.

    Each shard's errors are written before its windows: a task killed between the two leaves its ok files
    undone (redone on resume) and never a file recorded twice.
    """
    store = Store(store_uri)
    records = [SourceFile(**row) for row in batch.select(ERROR_SCHEMA.names).to_pylist()]
    files = list(zip(records, map(from_wire, batch.column("source").to_pylist())))
    size = shard_files or max(1, len(files))
    summary = {"path": [], "ok": [], "windows": [], "error": []}
    for start in range(0, len(files), size):
        _write_shard(store, files[start:start + size], cfg, png, max_seconds, summary, attempts)
    return pa.table(summary)


def _write_shard(store: Store, files: list[tuple[SourceFile, str]], cfg: FeatureConfig, png: bool,
                 max_seconds: float, summary: dict, attempts: Attempts | None = None) -> None:
    """Compute files and write them as one shard (and their PNGs); a line per file goes to `summary`."""
    found, errors = [], []
    for rec, source in files:
        if attempts is not None and not attempts.admit(rec.path):
            windows, err = None, PROCESS_DIED
        else:
            windows, err = process_file(rec, source, cfg, max_seconds)
            if attempts is not None:
                attempts.done(rec.path)
        if err is None:
            found.append(windows)
        else:
            errors.append(asdict(replace(rec, error=err)))
        for key, value in zip(summary, (rec.path, err is None, 0 if err else windows.num_rows, err or "")):
            summary[key].append(value)
    if png:
        for b in found:
            specs = b.column("logmel").values.to_numpy().reshape(b.num_rows, b["n_mels"][0].as_py(), -1)
            path, split, language = (b[k][0].as_py() for k in ("path", "split", "language"))
            for i, spec in enumerate(specs):
                write_atomic(store.fs, store.png_path(split, language, path, i), to_png(spec))
    sid = shard_id(r.path for r, _ in files)
    if errors:
        store.write_shard(ERRORS, pa.Table.from_pylist(errors, schema=ERROR_SCHEMA), sid)
    if found:
        store.write_shard(WINDOWS, pa.Table.from_batches(found, schema=WINDOW_SCHEMA), sid)


def utf8_record(record: SourceFile) -> SourceFile:
    """The record with its names as the store keeps them (uris.utf8_name)."""
    return replace(record, **{k: utf8_name(v) for k, v in asdict(record).items() if isinstance(v, str)})


MIN_FILES_PER_TASK = 4
# A task computes several shards, big ones first and single shards at the end (which even out the workers' last
# round): each task costs Ray Data's scheduling a pause of its worker and work in the driver, which one-shard tasks
# of 0.3 s paid 78 times per worker on 5,000 clips. At most this many shards, so that a task stays a few seconds
# of 10-s clips, progress keeps moving and a retried task redoes little.
MAX_SHARDS_PER_TASK = 8
TASK_ROUNDS = 2  # a task takes 1/(rounds x slots) of the shards left


def files_per_task(n_files: int, batch_size: int, cpus: int) -> int:
    """Files per shard (a task computes one or more): up to batch_size, fewer so that every CPU gets about four
    shards (no worker idles through a long last round), but not below a few files (tiny shards cost more than
    they save)."""
    spread = math.ceil(n_files / (4 * max(1, cpus)))
    return max(1, min(batch_size, max(spread, MIN_FILES_PER_TASK)))


def shards_per_task(n_shards: int, slots: int) -> list[int]:
    """Shards of each task in order: each takes 1/(TASK_ROUNDS x slots) of the shards left, 1 to MAX_SHARDS_PER_TASK."""
    sizes, left = [], n_shards
    while left > 0:
        sizes.append(min(left, MAX_SHARDS_PER_TASK, max(1, math.ceil(left / (TASK_ROUNDS * max(1, slots))))))
        left -= sizes[-1]
    return sizes


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

    def add(self, summary: pa.Table) -> None:
        """Count a batch of process_batch's per-file lines."""
        for path, ok, windows, error in zip(*(summary.column(k).to_pylist() for k in ("path", "ok", "windows", "error"))):
            if ok:
                self.ok += 1
                self.windows += windows
            else:
                self.failed += 1
                self.errors.append((path, error))


def _compute(files: list[tuple[SourceFile, str]], store_uri: str, cfg: FeatureConfig, png: bool, shard_files: int,
             num_cpus: float = 1.0, max_seconds: float = MAX_SECONDS, memory: int = 0,
             task_shards: int | None = None, attempts: Attempts | None = None) -> Iterator[pa.Table]:
    """The Ray Data pipeline over `files` (record, path to open): shards of `shard_files` files, grouped into tasks
    (`task_shards` each, or shards_per_task's sizes), each task writing its own shards; yields the tasks' per-file
    lines (path, ok, windows, error) as they finish."""
    import ray

    n_shards = math.ceil(len(files) / shard_files)
    if task_shards:
        sizes = [task_shards] * math.ceil(n_shards / task_shards)
    else:
        cpus = ray.cluster_resources().get("CPU", 1)
        sizes = shards_per_task(n_shards, int(cpus // num_cpus) if num_cpus > 0 else int(cpus))
    blocks, start = [], 0
    for k in sizes:
        blocks.append(work_table(files[start:start + k * shard_files]))
        start += k * shard_files
    out = ray.data.from_arrow(blocks).map_batches(
        process_batch, fn_args=(store_uri, cfg, png, max_seconds, shard_files, attempts), batch_size=None,
        batch_format="pyarrow", num_cpus=num_cpus, **({"memory": memory} if memory else {}))
    # one operator has nothing to share with: Ray Data's reservation held it to half the CPUs until its first
    # task ended (a whole first task with one of two cores idle); this dataset's own context, not the global one
    out.context.op_resource_reservation_enabled = False
    yield from out.iter_batches(batch_format="pyarrow", batch_size=None)


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
    max_seconds: float = MAX_SECONDS,
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
        records = [replace(r, split=split) for r in records]
    records = assign_splits(records, valid_fraction, seed)
    store = Store(output)
    store.init(cfg)
    store.remove_leftovers()  # hidden temporaries of a writer killed before its rename
    done = store.done_paths()
    todo = [(r, f.path) for r, f in zip(records, found.records) if r.path not in done]  # f.path: the file to open
    result = PreprocessResult(store=output, files_seen=len(records), skipped_done=len(records) - len(todo),
                              left_out=found.left_out)
    if todo:
        shard_files = files_per_task(len(todo), batch_size, int(ray.cluster_resources().get("CPU", 1)))
        attempts = Attempts()
        with tqdm(total=len(todo), unit="file", desc="preprocess", disable=not progress) as bar:
            try:
                for summary in _compute(todo, output, cfg, png, shard_files, num_cpus, max_seconds, memory,
                                        attempts=attempts):
                    result.add(summary)
                    bar.update(summary.num_rows)
            finally:
                attempts.close()
    result.seconds = time.perf_counter() - t0
    return result
