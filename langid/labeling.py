"""The bulk-labeling job: a directory or archive of audio -> one CSV row per file, streamed through Ray Data.

Pipeline: read (paths, or archive members as bytes) -> decode + log-mel windows in parallel tasks ->
batched inference in an actor pool (model loaded once per actor) -> rows appended to `<output>.partial`
as they arrive. The finished CSV appears under its name only when every input has its row; a rerun
resumes from the partial file and labels only what is missing.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from langid.audio import AudioError, load_audio
from langid.config import MAX_SECONDS
from langid.errors import BadValue, one_line
from langid.inputs import Item, iter_archive
from langid.poison import PROCESS_DIED, Attempts, crash_hook
from langid.timeline import SWITCH_PENALTY, check_switch_penalty, merge_segments  # merge_segments: callers import it from here too
from langid.uris import (atomic_output, exists, filesystem, from_wire, is_uri, open_input, opener, put_file,
                         remove_leftovers, staging_path, to_wire, utf8_name, write_atomic)

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
    max_seconds: float = MAX_SECONDS
    window_seconds: Optional[float] = None  # Whisper models: the window each answer looks at
    switch_penalty: float = SWITCH_PENALTY  # nats a language switch costs in the timeline

    def __post_init__(self):
        if not 0 <= self.overlap < 1:
            raise BadValue("--overlap must be in [0, 1)")
        if not 0 <= self.min_confidence <= 1:
            raise BadValue("--min-confidence must be in [0, 1]")
        if self.top_k < 1:
            raise BadValue("--top-k must be at least 1")
        check_switch_penalty(self.switch_penalty, "--switch-penalty")

    @property
    def hop_seconds_factor(self) -> float:
        return 1.0 - self.overlap


# ---------- pipeline stages (run in Ray tasks and actors; pyarrow batches in and out) ----------
# Every stage takes and returns Arrow columns: a file's windows travel as one flat float32 list (a zero-copy
# numpy view at the other end), its answers as typed columns; nothing is turned into JSON or Python rows.

def featurize_batch(batch: pa.Table, cfg_dict: dict, hop_factor: float, max_seconds: float,
                    attempts: Attempts) -> pa.Table:
    """Decode + windows + features for a batch of inputs; a failure becomes that file's error, and so does a
    file whose decoding has killed its process too often."""
    from langid.config import FeatureConfig
    from langid.features import window_features

    cfg = FeatureConfig.from_dict(cfg_dict)
    hop = cfg.window_seconds * hop_factor
    keys, errors = batch.column("key").to_pylist(), batch.column("error").to_pylist()
    paths, datas = batch.column("path"), batch.column("data")
    durations, specs, starts, speech = [], [], [], []
    for i, key in enumerate(keys):
        features = None
        if errors[i] is None and not attempts.admit(key):
            errors[i] = PROCESS_DIED
        elif errors[i] is None:
            try:
                data = datas[i].as_py()
                source = data if data is not None else opener(from_wire(paths[i].as_py()))
                crash_hook(key)
                audio = load_audio(source, cfg.sample_rate, max_seconds=max_seconds)
                # float32 as in the API, so the job gives exactly the API's answers
                features = window_features(audio.samples, cfg, hop, source_dbfs=audio.rms_dbfs)
            except AudioError as e:
                errors[i] = to_wire(str(e))  # libsndfile's message may quote the path
            except MemoryError:
                errors[i] = "too large to decode in memory"
            except Exception as e:  # a bug costs the file's row, with its reason, and nothing more
                errors[i] = to_wire(f"cannot decode: {one_line(e, named=True)}")
            attempts.done(key)
        durations.append(audio.duration if features is not None else 0.0)
        f = features or (np.zeros((0, *cfg.shape), np.float32), np.zeros(0), np.zeros(0, bool))
        specs.append(f[0].reshape(len(f[0]), int(np.prod(cfg.shape))))
        starts.append(np.asarray(f[1], np.float64))
        speech.append(np.asarray(f[2], bool))
    counts = np.array([len(s) for s in specs], np.int32)
    width = int(np.prod(cfg.shape))
    specs, starts, speech = (np.zeros((0, width), np.float32), *specs), (np.zeros(0), *starts), (np.zeros(0, bool), *speech)
    return pa.table({
        "key": pa.array(keys, pa.string()), "error": pa.array(errors, pa.string()),
        "duration": pa.array(durations, pa.float64()), "n_windows": pa.array(counts),
        "specs": _lists(np.concatenate(specs).ravel(), counts * width),
        "starts": _lists(np.concatenate(starts), counts), "speech": _lists(np.concatenate(speech), counts),
    }, schema=FEATURE_SCHEMA)


def _lists(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """One Arrow list per row from the rows' values laid end to end (no per-row conversion)."""
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _flat(column) -> np.ndarray:
    """The values of a list column laid end to end, as numpy."""
    import pyarrow.compute as pc

    return pc.list_flatten(column).to_numpy(zero_copy_only=False)


FEATURE_SCHEMA = pa.schema([
    ("key", pa.string()), ("error", pa.string()), ("duration", pa.float64()), ("n_windows", pa.int32()),
    ("specs", pa.list_(pa.float32())), ("starts", pa.list_(pa.float64())), ("speech", pa.list_(pa.bool_())),
])
SEGMENT_TYPE = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("language", pa.string()),
                          ("confidence", pa.float64())])


def result_schema(n_labels: int) -> pa.Schema:
    """The answers' columns: the CSV's, the probability of every language the model knows (NaN for one not
    among the candidates) and the file's timeline."""
    return pa.schema([
        ("path", pa.string()), ("language", pa.string()), ("confidence", pa.float64()),
        ("top_languages", pa.string()), ("duration", pa.float64()), ("windows", pa.int32()),
        ("windows_used", pa.int32()), ("status", pa.string()), ("error", pa.string()),
        ("probabilities", pa.list_(pa.float64(), n_labels)), ("segments", pa.list_(SEGMENT_TYPE)),
    ])


class Predictor:
    """Actor: loads the model once, then labels batches of featurized files with one batched forward."""

    def __init__(self, model_dir: str, opts: LabelOptions, threads: int = 1, backend: str = "onnx"):
        from langid.inference import load_model

        self.ident = load_model(model_dir, window_seconds=opts.window_seconds, threads=max(1, threads),
                                backend=backend)
        self.opts = opts
        self.schema = result_schema(len(self.ident.labels))

    def __call__(self, batch: pa.Table) -> pa.Table:
        ident, o = self.ident, self.opts
        keys, errors = batch.column("key").to_pylist(), batch.column("error").to_pylist()
        durations = batch.column("duration").to_numpy()
        ends = np.cumsum(batch.column("n_windows").to_numpy(), dtype=np.int64)
        specs = _flat(batch.column("specs")).reshape(-1, *ident.cfg.shape)
        starts, speech = _flat(batch.column("starts")), _flat(batch.column("speech"))
        try:
            lp = ident.logprobs(specs) if len(specs) else None
        except Exception as e:  # an error row with the reason, not a lost batch that passes for a dead process
            errors = [err or f"cannot label: {one_line(e, named=True)}" for err in errors]
        n_labels = len(ident.labels)
        cols = {name: [] for name in self.schema.names if name not in ("probabilities", "segments")}
        probs = np.full((len(keys), n_labels), np.nan)
        seg_counts, seg_rows = np.zeros(len(keys), np.int32), []
        for i, key in enumerate(keys):
            a, b = (ends[i - 1] if i else 0), ends[i]
            pred = None
            if errors[i] is None:
                try:
                    pred = ident.decide(key, lp[a:b], starts[a:b], speech[a:b], float(durations[i]), o.languages,
                                        o.min_confidence, o.top_k, o.switch_penalty)
                except Exception as e:
                    errors[i] = to_wire(f"cannot label: {one_line(e, named=True)}")
            if pred is None:
                values = ("", None, "", None, 0, 0, "error", errors[i])
            else:
                values = (pred.language, round(pred.confidence, 6),
                          " ".join(f"{lang}:{p:.4f}" for lang, p in pred.top), round(pred.duration, 3),
                          pred.windows, pred.windows_used, "ok", pred.error)
                for lang, p in pred.probabilities.items():
                    probs[i, ident.labels.index(lang)] = p
                merged = merge_segments(pred.segments)
                seg_counts[i] = len(merged)
                seg_rows += [(s.start, s.end, s.language, s.confidence) for s in merged]
            cols["path"].append(key)
            for name, value in zip(BASE_COLUMNS[1:], values):
                cols[name].append(value)
        segments = pa.StructArray.from_arrays(
            [pa.array([r[k] for r in seg_rows], t.type) for k, t in enumerate(SEGMENT_TYPE)], fields=list(SEGMENT_TYPE))
        offsets = np.concatenate([[0], np.cumsum(seg_counts)]).astype(np.int32)
        arrays = {name: pa.array(values, self.schema.field(name).type) for name, values in cols.items()}
        arrays["probabilities"] = pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel()), n_labels)
        arrays["segments"] = pa.ListArray.from_arrays(pa.array(offsets), segments)
        return pa.table(arrays, schema=self.schema)


def read_items(batch: pa.Table, all_files: bool, skip: frozenset):
    """Generator stage: expand an input (path chunk or archive) into rows with a path or the member's bytes.

    Keys are the paths as the user gave them; files are opened relative to the driver's working directory
    (`cwd` of the unit), since a Ray worker's own working directory is the cluster's, not the driver's.
    """
    rows = []
    for unit in batch.to_pylist():  # one unit: a few paths or one archive
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
        raise BadValue(f"{path} was written with other columns ({','.join(header)}); use a new --output "
                         "or the same flags")


def _rewrite(path: str, columns: list[str], rows: list) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)


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


@dataclass
class LabelJob:
    """One labeling run: what to label, where the answers go, how to answer, and the resources to use."""

    model: str
    input: str
    output: str  # the CSV; the Python API also takes a URI (written locally, then copied)
    options: LabelOptions = field(default_factory=LabelOptions)
    segments: Optional[str] = None  # a timeline CSV beside it
    parquet: Optional[str] = None  # the CSV again as typed Parquet
    all_files: bool = False  # every file, not only audio extensions
    backend: str = "onnx"  # trained models: ONNX Runtime, or "torch" (the reference)
    actors: int = 1
    cpus_per_actor: float = 1.0
    threads_per_actor: int = 0  # 0: twice the CPUs an actor reserves (see actor_threads)
    gpus_per_actor: float = 0.0
    memory_per_actor: int = 0
    cpus_per_task: float = 1.0  # per decoding task
    batch_size: int = 16  # files per inference batch
    progress: bool = True


def run_label(model_dir: str, input_spec: str, output: str, opts: LabelOptions = LabelOptions(),
              **job) -> LabelResult:
    """Label every input file into `output` (CSV), resuming from `<output>.partial`; Ray must be initialised.
    `job` takes the other fields of LabelJob (segments, parquet, actors, batch_size, progress, ...)."""
    return label(LabelJob(model_dir, input_spec, output, opts, **job))


def label(job: LabelJob, meta: Optional[dict] = None) -> LabelResult:
    """The job's steps: check the model, resume the outputs, plan the inputs, stream them through the pipeline,
    publish the finished files. `meta`: the model's describe_model(), when the caller has already checked it."""
    from tqdm.auto import tqdm

    from langid.inference import check_languages, describe_model  # here: decode tasks need no torch

    t0 = time.perf_counter()
    meta = meta or describe_model(job.model, job.options.window_seconds, job.backend)
    check_languages(job.options.languages, meta["labels"])
    if job.parquet and not job.options.probabilities:  # the Parquet output carries the full probability vector
        job = replace(job, options=replace(job.options, probabilities=True))
    local = _staged(job)
    out = Outputs(local, meta["labels"])
    plan = Plan.of(local, out.done)
    result = LabelResult(output=job.output, resumed=len(out.done))
    if plan.units:
        with out.appending(), tqdm(desc="label", unit="file", total=plan.total, disable=not job.progress) as bar:
            _stream(local, meta, plan.units, out, bar)
        result.labelled = out.labelled
    out.publish()
    _summarise(local.output, meta["labels"], result)
    if local.parquet:
        write_parquet(local.output, local.parquet)
    _upload(job, local)
    result.seconds = time.perf_counter() - t0
    return result


def _staged(job: LabelJob) -> LabelJob:
    """The job with its URI outputs replaced by local staging files (where a rerun finds them)."""
    local = {name: staging_path(getattr(job, name), os.path.basename(getattr(job, name)))
             for name in ("output", "segments", "parquet") if getattr(job, name) and is_uri(getattr(job, name))}
    if "output" in local and exists(job.output) and not os.path.exists(local["output"] + PARTIAL):
        _download(job.output, local["output"])  # a finished run being extended, as for a local CSV
    return replace(job, **local)


def _upload(job: LabelJob, local: LabelJob) -> None:
    for name in ("output", "segments", "parquet"):
        target = getattr(job, name)
        if target and is_uri(target):
            put_file(getattr(local, name), target)
            os.remove(getattr(local, name))


def _download(uri: str, local: str) -> None:
    with open_input(uri) as src:
        write_atomic(*filesystem(local), src)


class Outputs:
    """The CSV (and timeline) of a run: resumed from the partial files, appended a batch at a time, published by
    renaming when every input has its row."""

    def __init__(self, job: LabelJob, labels: Sequence[str]):
        self.job, self.labels = job, labels
        self.columns = csv_columns(labels, job.options)
        self.partial = job.output + PARTIAL
        self.seg_partial = job.segments + PARTIAL if job.segments else None
        for target in (job.output, self.partial, job.segments, self.seg_partial, job.parquet):
            if target:
                remove_leftovers(target)
        if os.path.exists(job.output) and not os.path.exists(self.partial):
            _check_header(job.output, self.columns)  # other flags: refused while the finished CSV is in place
            os.replace(job.output, self.partial)  # a finished run being extended: appended, then renamed back
        self.done = recover_partial(self.partial, self.columns)
        if self.seg_partial:
            if os.path.exists(job.segments) and not os.path.exists(self.seg_partial):
                os.replace(job.segments, self.seg_partial)
            filter_segments(self.seg_partial, self.done)
        if not os.path.exists(self.partial):
            _rewrite(self.partial, self.columns, [])
        self.labelled = 0
        self._files = None

    @contextmanager
    def appending(self):
        def open_csv(path):
            return open(path, "a", newline="", encoding="utf-8", errors="surrogateescape")

        with open_csv(self.partial) as f, (open_csv(self.seg_partial) if self.seg_partial else nullcontext()) as sf:
            self._files = (f, csv.writer(f), sf, csv.writer(sf) if sf else None)
            try:
                yield self
            finally:
                self._files = None

    def write(self, batch: pa.Table) -> int:
        """Append a batch of answers (a file already written is not written again); returns the new rows."""
        f, w, sf, sw = self._files
        rows, segments = answer_rows(batch, self.job.options), segment_rows(batch) if sw else {}
        fresh = [r for r in rows if r[0] not in self.done]
        self.done.update(r[0] for r in fresh)
        if sw:  # a file's timeline before its label row: a crash in between leaves segments the resume drops
            sw.writerows(s for r in fresh for s in segments.get(r[0], ()))
            sf.flush()
        w.writerows(fresh)
        f.flush()
        self.labelled += len(fresh)
        return len(fresh)

    def publish(self) -> None:
        if self.seg_partial:
            os.replace(self.seg_partial, self.job.segments)
        os.replace(self.partial, self.job.output)


def answer_rows(batch: pa.Table, opts: LabelOptions) -> list[list]:
    """CSV rows of a batch of answers (result_schema), column by column."""
    cols = [batch.column(c).to_pylist() for c in BASE_COLUMNS]
    cols[0] = [from_wire(p) for p in cols[0]]
    cols[-1] = [from_wire(e) for e in cols[-1]]
    rows = [["" if v is None else v for v in row] for row in zip(*cols)]
    if opts.probabilities:
        probs = _flat(batch.column("probabilities")).reshape(batch.num_rows, -1)
        for row, p in zip(rows, probs):
            row += ["" if np.isnan(x) else f"{x:.6f}" for x in p]
    return rows


def segment_rows(batch: pa.Table) -> dict:
    """{path: timeline CSV rows} of a batch of answers."""
    import pyarrow.compute as pc

    counts = pc.list_value_length(batch.column("segments")).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(batch.column("segments"))
    fields = [pc.struct_field(flat, name).to_pylist() for name in ("start", "end", "language", "confidence")]
    out, pos = {}, 0
    for path, n in zip(batch.column("path").to_pylist(), counts):
        out[from_wire(path)] = [[from_wire(path), round(s, 3), round(e, 3), lang, round(c, 6)]
                                for s, e, lang, c in zip(*(f[pos:pos + n] for f in fields))]
        pos += n
    return out


@dataclass
class Plan:
    """The inputs still to label, as units for the reading stage: a few paths, or one archive."""

    units: list
    total: Optional[int]  # files to label, when known before reading archives

    @classmethod
    def of(cls, job: LabelJob, done: set) -> "Plan":
        import ray

        from langid.inputs import is_archive, list_inputs

        found, kind = list_inputs(job.input, job.all_files)
        archives = [p for p in found if kind != "directory" and is_archive(p)]
        plain = [p for p in found if p not in done and p not in set(archives)]
        # small units: each is one block all the way through, so decoding runs in parallel tasks and rows reach
        # the partial file (and survive a crash) a few at a time instead of all at the end
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        chunk = max(1, min(UNIT_FILES, math.ceil(len(plain) / (4 * cpus))))
        cwd = to_wire(os.getcwd())  # relative inputs are opened from the driver's directory, not the workers'
        units = [{"archive": False, "spec": "", "paths": [to_wire(p) for p in plain[i:i + chunk]], "cwd": cwd}
                 for i in range(0, len(plain), chunk)]
        units += [{"archive": True, "spec": to_wire(a), "paths": [], "cwd": cwd} for a in archives]
        return cls(units, None if archives else len(plain))


def _stream(job: LabelJob, meta: dict, units: list, out: Outputs, bar) -> None:
    """Run units through read -> featurize -> Predictor and append the answers as they arrive."""
    import ray

    from langid.whisper import absolute_model

    opts = job.options
    # actors hold their CPUs for the whole job: on a Ray with no CPU left over for one decoding task (e.g.
    # --num-cpus 1) decoding would never be scheduled and the job would wait forever, so the actors then
    # reserve only what decoding leaves (a cluster still at 0 CPUs is left to its autoscaler)
    total_cpus = ray.cluster_resources().get("CPU", 0)
    actor_cpus = job.cpus_per_actor
    if 1 <= total_cpus < job.actors * job.cpus_per_actor + job.cpus_per_task:
        actor_cpus = max(0.0, (total_cpus - job.cpus_per_task) / job.actors)
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    # an archive is one unit: its members (bytes) leave the reading task in blocks of this size rather
    # than Ray Data's default 128 MiB, which would hold back and serialise hundreds of files at a time
    ds.context.target_max_block_size = ARCHIVE_BLOCK_BYTES
    ds = ds.map_batches(read_items, fn_args=(job.all_files, frozenset(out.done)), batch_size=1,
                        batch_format="pyarrow", num_cpus=0.25)
    # decoding reserves its memory, which also keeps Ray Data from fusing it into the model actors (whose
    # resources differ): it stays in parallel tasks on every free CPU while the actors only run the network
    cfg = meta["feature_config"]
    attempts = Attempts()
    ds = ds.map_batches(featurize_batch, fn_args=(cfg.to_dict(), opts.hop_seconds_factor, opts.max_seconds, attempts),
                        batch_size=4, batch_format="pyarrow", num_cpus=job.cpus_per_task,
                        memory=_decode_memory(job))
    ds = ds.map_batches(Predictor,  # the actors open the model from the cluster's working directory
                        fn_constructor_args=(absolute_model(job.model), opts, actor_threads(job), job.backend),
                        batch_size=job.batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=job.actors), num_cpus=actor_cpus,
                        num_gpus=job.gpus_per_actor, **({"memory": job.memory_per_actor} if job.memory_per_actor else {}))
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            bar.update(out.write(batch))
    finally:
        attempts.close()


def actor_threads(job: LabelJob) -> int:
    """The model's threads in each actor: `threads_per_actor`, or twice the CPUs the actor reserves. The extra
    threads run on the CPU that decoding leaves idle between its batches (ONNX Runtime's threads do not spin, so
    they yield it back): on 2 cores 1.17x the files/s of one thread (benchmarks/label.py)."""
    return job.threads_per_actor or 2 * max(1, round(job.cpus_per_actor))


DECODE_MEMORY = 256 << 20  # a decoding task's reservation: a batch of files of several minutes and their windows


def _decode_memory(job: LabelJob) -> int:
    """The decoding tasks' memory, never the same as the actors' (equal resources would fuse the two stages)."""
    return DECODE_MEMORY + (job.memory_per_actor == DECODE_MEMORY)


def _summarise(output: str, labels: Sequence[str], result: LabelResult) -> None:
    from langid.evaluation import accuracy_from_names  # here: the decoding tasks import this module, without torch

    def answers(rows):
        for row in rows:
            result.total += 1
            if row["status"] != "ok":
                result.errors += 1
                continue
            result.per_language[row["language"]] = result.per_language.get(row["language"], 0) + 1
            yield row["path"], row["language"]

    with open(output, newline="", encoding="utf-8", errors="surrogateescape") as f:
        result.known, result.correct = accuracy_from_names(answers(csv.DictReader(f)), labels)


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
            text = pa.array([utf8_name(b) for b in column.to_pylist()], pa.string())
        table = table.set_column(table.schema.get_field_index(name), name, text)
    with atomic_output(parquet_path) as tmp:
        pq.write_table(table, tmp)
