"""The bulk-labeling job: a directory or archive of audio -> one CSV row per file, streamed through Ray Data.

Pipeline: read (paths, or archive members as bytes) -> decode + log-mel windows in parallel tasks ->
batched inference in an actor pool (model loaded once per actor) -> rows appended to `<output>.partial`
as they arrive. The finished CSV appears under its name only when every input has its row; a rerun
resumes from the partial file and labels only what is missing.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from langid.audio import AudioError, load_audio
from langid.inputs import MEMBER_SEP, Item, iter_archive
from langid.timeline import SWITCH_PENALTY, check_switch_penalty, merge_segments  # merge_segments: callers import it from here too
from langid.uris import exists, is_uri, open_input, put_file, staging_path

BASE_COLUMNS = ["path", "language", "confidence", "top_languages", "duration", "windows", "windows_used",
                "status", "error"]
SEGMENT_COLUMNS = ["path", "start", "end", "language", "confidence"]
PARTIAL = ".partial"
UNIT_FILES = 16  # at most this many paths per Ray Data block
ARCHIVE_BLOCK_BYTES = 8 << 20


@dataclass
class LabelOptions:
    languages: Optional[list] = None
    min_confidence: float = 0.0
    top_k: int = 3
    overlap: float = 0.0  # fraction of a window shared with the next one, for long files
    probabilities: bool = False
    max_seconds: float = 4 * 3600.0
    window_seconds: Optional[float] = None  # Whisper models: the window each answer looks at
    switch_penalty: float = SWITCH_PENALTY  # nats a language switch costs in the timeline

    def __post_init__(self):
        if not 0 <= self.overlap < 1:
            raise ValueError("--overlap must be in [0, 1)")
        if not 0 <= self.min_confidence <= 1:
            raise ValueError("--min-confidence must be in [0, 1]")
        if self.top_k < 1:
            raise ValueError("--top-k must be at least 1")
        check_switch_penalty(self.switch_penalty, "--switch-penalty")

    @property
    def hop_seconds_factor(self) -> float:
        return 1.0 - self.overlap


# ---------- keys through Arrow ----------
# A file name that is not UTF-8 reaches Python with its odd bytes as surrogate escapes (\udc80-\udcff), which
# Arrow strings (every Ray Data block) refuse. Between the driver and the workers such a character travels as
# NUL + the byte's character: reversible, because no path or archive member name contains NUL. The CSV gets
# the original bytes back (it is written with errors="surrogateescape").
_SURROGATE = re.compile("[\udc80-\udcff]")
_ESCAPED = re.compile("\x00(.)", re.S)


def to_wire(text: Optional[str]) -> Optional[str]:
    return None if text is None else _SURROGATE.sub(lambda m: "\x00" + chr(ord(m.group()) - 0xDC00), text)


def from_wire(text: Optional[str]) -> Optional[str]:
    return None if text is None else _ESCAPED.sub(lambda m: chr(0xDC00 + ord(m.group(1))), text)


# ---------- pipeline stages (run in Ray tasks and actors) ----------

def featurize_batch(batch: pa.Table, cfg_dict: dict, hop_factor: float, max_seconds: float) -> pa.Table:
    """Decode + windows + log-mel for a batch of inputs; a failure becomes that row's error."""
    from langid.config import FeatureConfig
    from langid.features import window_features

    cfg = FeatureConfig.from_dict(cfg_dict)
    hop = cfg.window_seconds * hop_factor
    out = []
    for row in batch.to_pylist():
        rec = {"key": row["key"], "error": row.get("error"), "duration": 0.0, "n_windows": 0, "specs": b"",
               "starts": [], "speech": []}
        if rec["error"] is None:
            try:
                source = row["data"] if row.get("data") is not None else _openable(from_wire(row["path"]))
                audio = load_audio(source, cfg.sample_rate, max_seconds=max_seconds)
                # float32 as in the API, so the job gives exactly the API's answers
                specs, starts, speech = window_features(audio.samples, cfg, hop)
                rec.update(duration=audio.duration, n_windows=len(specs), specs=specs.tobytes(),
                           starts=starts.tolist(), speech=speech.tolist())
            except AudioError as e:
                rec["error"] = to_wire(str(e))  # libsndfile's message may quote the path
            except MemoryError:
                rec["error"] = "too large to decode in memory"
        out.append(rec)
    return pa.Table.from_pylist(out, schema=FEATURE_SCHEMA)


def _openable(path: str):
    """The path, or for a name that is not UTF-8 (which libsndfile's wrapper cannot encode) its opened file."""
    if _SURROGATE.search(path) is None:
        return path
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return path  # decoding says "empty file" without opening it
    try:
        return io.BytesIO(open(path, "rb").read())
    except OSError as e:
        raise AudioError(f"cannot open: {e.strerror or e}") from None


FEATURE_SCHEMA = pa.schema([
    ("key", pa.string()), ("error", pa.string()), ("duration", pa.float64()), ("n_windows", pa.int32()),
    ("specs", pa.large_binary()), ("starts", pa.list_(pa.float64())), ("speech", pa.list_(pa.bool_())),
])


class Predictor:
    """Actor: loads the model once, then labels batches of featurized files with one batched forward."""

    def __init__(self, model_dir: str, opts: LabelOptions, threads: int = 1):
        import torch

        from langid.inference import load_model

        torch.set_num_threads(max(1, threads))
        self.ident = load_model(model_dir, window_seconds=opts.window_seconds, threads=max(1, threads))
        self.opts = opts

    def __call__(self, batch: pa.Table) -> pa.Table:
        ident, o = self.ident, self.opts
        shape = ident.cfg.shape
        rows = batch.to_pylist()
        ok = [r for r in rows if r["error"] is None]
        specs = [np.frombuffer(r["specs"], np.float32).reshape(-1, *shape) for r in ok]
        lp = ident.logprobs(np.concatenate(specs)) if specs else None
        out, offset = [], 0
        results = {}
        for r, s in zip(ok, specs):
            pred = ident.decide(r["key"], lp[offset:offset + len(s)], np.array(r["starts"]), np.array(r["speech"]),
                                r["duration"], o.languages, o.min_confidence, o.top_k, o.switch_penalty)
            offset += len(s)
            results[r["key"]] = pred
        for r in rows:
            pred = results.get(r["key"])
            if pred is None:
                out.append({"path": r["key"], "language": "", "confidence": None, "top_languages": "",
                            "duration": None, "windows": 0, "windows_used": 0, "status": "error",
                            "error": r["error"], "probabilities": "", "segments": ""})
                continue
            out.append({
                "path": r["key"], "language": pred.language, "confidence": round(pred.confidence, 6),
                "top_languages": " ".join(f"{lang}:{p:.4f}" for lang, p in pred.top),
                "duration": round(pred.duration, 3), "windows": pred.windows, "windows_used": pred.windows_used,
                "status": "ok", "error": pred.error, "probabilities": json.dumps(pred.probabilities),
                "segments": json.dumps([[s.start, s.end, s.language, s.confidence] for s in merge_segments(pred.segments)]),
            })
        return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)


RESULT_SCHEMA = pa.schema([
    ("path", pa.string()), ("language", pa.string()), ("confidence", pa.float64()), ("top_languages", pa.string()),
    ("duration", pa.float64()), ("windows", pa.int32()), ("windows_used", pa.int32()), ("status", pa.string()),
    ("error", pa.string()), ("probabilities", pa.string()), ("segments", pa.string()),
])


def read_items(batch: pa.Table, all_files: bool, skip: frozenset):
    """Generator stage: expand an input (path chunk or archive) into rows with a path or the member's bytes.

    Keys are the paths as the user gave them; files are opened relative to the driver's working directory
    (`cwd` of the unit), since a Ray worker's own working directory is the cluster's, not the driver's.
    """
    rows = []
    for unit in batch.to_pylist():
        base = from_wire(unit["cwd"])
        if unit["archive"]:
            spec = from_wire(unit["spec"])
            items = _unique(iter_archive(os.path.join(base, spec), all_files, name=spec), skip)
        else:
            items = (Item(key=p, path=p if is_uri(p) else os.path.join(base, p)) for p in map(from_wire, unit["paths"]))
        for item in items:
            rows.append({"key": to_wire(item.key), "path": to_wire(item.path), "data": item.data,
                         "error": to_wire(item.error)})
            if len(rows) >= 8:
                yield pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)


def _unique(items, skip: frozenset):
    seen = set()
    for item in items:
        if item.key not in seen and item.key not in skip:
            seen.add(item.key)
            yield item


ITEM_SCHEMA = pa.schema([("key", pa.string()), ("path", pa.string()), ("data", pa.large_binary()),
                         ("error", pa.string())])


# ---------- output files ----------

def csv_columns(labels: Sequence[str], opts: LabelOptions) -> list[str]:
    return BASE_COLUMNS + ([f"p_{x}" for x in labels] if opts.probabilities else [])


def recover_partial(path: str, columns: list[str]) -> set:
    """Keys already labelled in a partial (or finished) CSV; a row cut by a crash is dropped, the file rewritten."""
    if not os.path.exists(path):
        return set()
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    rows = []
    cut_in_quotes = False
    try:
        for row in csv.reader(io.StringIO(text), strict=True):
            rows.append(row)
    except csv.Error:
        cut_in_quotes = True  # a crash cut the last row inside a quoted field (maybe just after a newline in it)
    complete = text.endswith("\n") and not cut_in_quotes
    if rows and not complete and not cut_in_quotes:
        rows.pop()  # cut mid-row
    if rows:
        _check_header(path, columns)
    body = [r for r in rows[1:] if len(r) == len(columns)]
    seen, unique = set(), []
    for r in body:
        if r[0] not in seen:
            seen.add(r[0])
            unique.append(r)
    if len(unique) != len(rows) - 1 or not complete or not rows:
        _rewrite(path, columns, unique)
    return seen


def _check_header(path: str, columns: list[str]) -> None:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        header = next(csv.reader(f), None)
    if header is not None and header != columns:
        raise ValueError(f"{path} was written with other columns ({','.join(header)}); use a new --output "
                         "or the same flags")


def _rewrite(path: str, columns: list[str], rows: list) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    os.replace(tmp, path)


def filter_segments(path: str, done: set) -> None:
    """Keep only timeline rows of files whose label row exists (a crash may have cut in between)."""
    if not os.path.exists(path):
        _rewrite(path, SEGMENT_COLUMNS, [])
        return
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        try:
            rows = list(csv.reader(f, strict=True))
        except csv.Error:
            rows = []
    _rewrite(path, SEGMENT_COLUMNS, [r for r in rows[1:] if len(r) == len(SEGMENT_COLUMNS) and r[0] in done])


# ---------- the driver ----------

@dataclass
class LabelResult:
    output: str
    total: int = 0
    resumed: int = 0
    labelled: int = 0
    errors: int = 0
    per_language: dict = field(default_factory=dict)
    known: int = 0
    correct: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        langs = ", ".join(f"{k} {v}" for k, v in sorted(self.per_language.items(), key=lambda kv: -kv[1]))
        acc = f"; accuracy {self.correct / self.known:.4f} on {self.known} files whose language the name tells" \
            if self.known else ""
        return (f"{self.total} files in {self.output}: {self.resumed} from an earlier run, {self.labelled} labelled now "
                f"in {self.seconds:.1f} s, {self.errors} errors. Languages: {langs or 'none'}{acc}")


def true_language(key: str, labels: Sequence[str]) -> Optional[str]:
    """The language a file's name or folder tells (Kaggle name, or a parent folder named after a language)."""
    from langid.sources import BadName, parse_kaggle_name

    name = key.split(MEMBER_SEP)[-1]
    try:
        return parse_kaggle_name(os.path.basename(name))["language"]
    except BadName:
        parts = name.replace("\\", "/").split("/")[:-1]
        return next((p for p in reversed(parts) if p in labels), None)


def run_label(model_dir: str, input_spec: str, output: str, opts: LabelOptions = LabelOptions(),
              segments: Optional[str] = None, parquet: Optional[str] = None, all_files: bool = False,
              actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, batch_size: int = 16,
              progress: bool = True, memory_per_actor: int = 0, cpus_per_task: float = 1.0) -> LabelResult:
    """Label every input file into `output` (CSV), resuming from `<output>.partial`; Ray must be initialised.

    Outputs at URIs are written in a local staging folder (where a rerun finds them) and copied when complete.
    """
    targets = [output, segments, parquet]
    output, segments, parquet = (_staged(x) for x in targets)
    if is_uri(targets[0]) and exists(targets[0]) and not os.path.exists(output + PARTIAL):
        _download(targets[0], output)  # a finished run being extended, as for a local CSV
    result = _run_label(model_dir, input_spec, output, opts, segments, parquet, all_files, actors, cpus_per_actor,
                        gpus_per_actor, batch_size, progress, memory_per_actor, cpus_per_task)
    for local, target in zip((output, segments, parquet), targets):
        if target and is_uri(target):
            put_file(local, target)
            os.remove(local)
    result.output = targets[0]
    return result


def _staged(location: Optional[str]) -> Optional[str]:
    return staging_path(location, os.path.basename(location)) if location and is_uri(location) else location


def _download(uri: str, local: str) -> None:
    with open_input(uri) as src, open(local + ".download", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(local + ".download", local)


def _run_label(model_dir: str, input_spec: str, output: str, opts: LabelOptions, segments: Optional[str],
               parquet: Optional[str], all_files: bool, actors: int, cpus_per_actor: float, gpus_per_actor: float,
               batch_size: int, progress: bool, memory_per_actor: int, cpus_per_task: float) -> LabelResult:
    import ray
    from tqdm.auto import tqdm

    from langid.inference import check_languages, describe_model  # here: decode tasks need no torch
    from langid.inputs import is_archive, list_inputs
    from langid.whisper import absolute_model

    t0 = time.perf_counter()
    meta = describe_model(model_dir, opts.window_seconds)
    labels = meta["labels"]

    check_languages(opts.languages, labels)
    if parquet and not opts.probabilities:  # the Parquet output carries the full probability vector
        opts = replace(opts, probabilities=True)
    columns = csv_columns(labels, opts)
    partial = output + PARTIAL
    if os.path.exists(output) and not os.path.exists(partial):
        _check_header(output, columns)  # other flags: refused while the finished CSV is still under its name
        os.replace(output, partial)  # a finished run being extended: new files are appended, then renamed back
    done = recover_partial(partial, columns)
    seg_partial = segments + PARTIAL if segments else None
    if segments:
        if os.path.exists(segments) and not os.path.exists(seg_partial):
            os.replace(segments, seg_partial)
        filter_segments(seg_partial, done)
    if not os.path.exists(partial):
        _rewrite(partial, columns, [])
    paths, kind = list_inputs(input_spec, all_files)
    units = []
    cwd = os.getcwd()  # relative inputs and the model are resolved here, not in the workers' own directory
    plain = [p for p in paths if not (kind != "directory" and is_archive(p)) and p not in done]
    # small units: each is one block all the way through, so decoding runs in parallel tasks and rows reach
    # the partial file (and survive a crash) a few at a time instead of all at the end
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunk = max(1, min(UNIT_FILES, math.ceil(len(plain) / (4 * cpus))))
    for i in range(0, len(plain), chunk):
        units.append({"archive": False, "spec": "", "paths": [to_wire(p) for p in plain[i:i + chunk]],
                      "cwd": to_wire(cwd)})
    for p in paths:
        if kind != "directory" and is_archive(p):
            units.append({"archive": True, "spec": to_wire(p), "paths": [], "cwd": to_wire(cwd)})
    result = LabelResult(output=output, resumed=len(done))
    # actors hold their CPUs for the whole job: on a Ray with no CPU left over for one decoding task (e.g.
    # --num-cpus 1) decoding would never be scheduled and the job would wait forever, so the actors then
    # reserve only what decoding leaves (a cluster still at 0 CPUs is left to its autoscaler)
    total_cpus = ray.cluster_resources().get("CPU", 0)
    actor_cpus = cpus_per_actor
    if 1 <= total_cpus < actors * cpus_per_actor + cpus_per_task:
        actor_cpus = max(0.0, (total_cpus - cpus_per_task) / actors)
    if units:
        cfg = meta["feature_config"]
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        # an archive is one unit: its members (bytes) leave the reading task in blocks of this size rather
        # than Ray Data's default 128 MiB, which would hold back and serialise hundreds of files at a time
        ds.context.target_max_block_size = ARCHIVE_BLOCK_BYTES
        ds = ds.map_batches(read_items, fn_args=(all_files, frozenset(done)), batch_size=1,
                            batch_format="pyarrow", num_cpus=0.25)
        # a remote-args function keeps Ray Data from fusing decoding into the model actors: decoding stays in
        # parallel tasks on every free CPU while the actors only run the network
        ds = ds.map_batches(featurize_batch, fn_args=(cfg.to_dict(), opts.hop_seconds_factor, opts.max_seconds),
                            batch_size=4, batch_format="pyarrow", ray_remote_args_fn=lambda: {"num_cpus": cpus_per_task})
        ds = ds.map_batches(Predictor,  # the actors open the model from the cluster's working directory
                            fn_constructor_args=(absolute_model(model_dir), opts, int(max(1, cpus_per_actor))),
                            batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
                            num_cpus=actor_cpus, num_gpus=gpus_per_actor,
                            **({"memory": memory_per_actor} if memory_per_actor else {}))
        bar = tqdm(desc="label", unit="file", disable=not progress)
        with open(partial, "a", newline="", encoding="utf-8", errors="surrogateescape") as f, \
                (open(seg_partial, "a", newline="", encoding="utf-8", errors="surrogateescape")
                 if seg_partial else open(os.devnull, "w")) as sf:
            w, sw = csv.writer(f), csv.writer(sf)
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for row in batch.to_pylist():
                    row["path"], row["error"] = from_wire(row["path"]), from_wire(row["error"])
                    if row["path"] in done:
                        continue
                    done.add(row["path"])
                    if seg_partial and row["segments"]:
                        for start, end, lang, conf in json.loads(row["segments"]):
                            sw.writerow([row["path"], round(start, 3), round(end, 3), lang, round(conf, 6)])
                        sf.flush()
                    w.writerow(_csv_row(row, labels, opts))
                    result.labelled += 1
                f.flush()
                bar.update(batch.num_rows)
        bar.close()
    if seg_partial:
        os.replace(seg_partial, segments)
    os.replace(partial, output)
    _summarise(output, labels, result)
    if parquet:
        write_parquet(output, parquet)
    result.seconds = time.perf_counter() - t0
    return result


def _csv_row(row: dict, labels: Sequence[str], opts: LabelOptions) -> list:
    values = [row[c] if row[c] is not None else "" for c in BASE_COLUMNS]
    if opts.probabilities:
        probs = json.loads(row["probabilities"]) if row["probabilities"] else {}
        values += [f"{probs[x]:.6f}" if x in probs else "" for x in labels]
    return values


def _summarise(output: str, labels: Sequence[str], result: LabelResult) -> None:
    with open(output, newline="", encoding="utf-8", errors="surrogateescape") as f:
        for row in csv.DictReader(f):
            result.total += 1
            if row["status"] != "ok":
                result.errors += 1
                continue
            result.per_language[row["language"]] = result.per_language.get(row["language"], 0) + 1
            truth = true_language(row["path"], labels)
            if truth is not None:
                result.known += 1
                result.correct += truth == row["language"]


def write_parquet(csv_path: str, parquet_path: str) -> None:
    """The finished CSV as typed Parquet (atomically), for DuckDB/Arrow users.

    Text that is not UTF-8 (a file name's odd bytes, kept as they are in the CSV) becomes `\\xNN` here,
    since Parquet strings must be UTF-8.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    text_columns = ("path", "language", "error", "top_languages", "status")
    table = pacsv.read_csv(csv_path, parse_options=pacsv.ParseOptions(newlines_in_values=True),  # names may hold \n
                           convert_options=pacsv.ConvertOptions(
        column_types={c: pa.binary() for c in text_columns}, strings_can_be_null=False))
    for name in text_columns:
        column = table.column(name)
        try:
            text = column.cast(pa.string())
        except pa.ArrowInvalid:
            text = pa.array([b.decode("utf-8", "backslashreplace") for b in column.to_pylist()], pa.string())
        table = table.set_column(table.schema.get_field_index(name), name, text)
    tmp = parquet_path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, parquet_path)
