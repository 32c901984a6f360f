#!/usr/bin/env python
"""Preprocessing throughput: the Ray job end to end against the compute limit measured in the same run.

The main figure: run_preprocess on 5,000 generated 10-s 22,050 Hz mono FLAC clips (the Kaggle set's kind) with
2 CPUs, in a freshly started embedded Ray (cold workers, as a user's job meets them), as a share of the compute
limit = decode + resample + log-mel per core, in one plain process on a sample of the same clips, × the cores.
Beside it: the steady rate (first shard to last), the start-up, where the CPU went (workers, driver, Ray), the
same job with PNGs, the job's own work without Ray, the write-up's librosa + matplotlib loop, and a profile.

    python benchmarks/preprocess.py                   # 5,000 clips, 2 CPUs: about 4 minutes on 2 cores
    python benchmarks/preprocess.py --repeat 3        # the main run three times (each with its load)
    python benchmarks/preprocess.py --quick           # 100 clips, no PNG run, no profile: a smoke check
    python benchmarks/preprocess.py --input demo/corpus --clips 200
Generated clips are cached in $LANGID_BENCH_CLIPS (default /tmp/langid-bench-clips) and reused by later runs:
the first run of 5,000 clips spends about 4 minutes (2 cores) writing them, 1.2 GB.
Results: a Markdown table on stdout and in benchmarks/results/preprocess.{md,json}.
"""
from __future__ import annotations

import argparse
import cProfile
import concurrent.futures
import hashlib
import logging
import os
import pstats
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import soundfile as sf

from common import (Poller, _cmdline, clocks, cpu_count, facts_line, load_average, machine_facts, markdown_table,
                    stopwatch, tree_cpu_seconds, write_results)

from langid.audio import load_audio
from langid.config import MAX_SECONDS, FeatureConfig
from langid.features import log_mel, windows
from langid.preprocess import process_batch, run_preprocess, work_table
from langid.sources import assign_splits, find_sources
from langid.store import ERRORS, WINDOWS, Store
from langid.uris import atomic_output

SOURCE_RATE = 22050
CLIP_SECONDS = 10.0
LANGUAGES = ("de", "en", "es")
FRAGMENTS_PER_RECORDING = 5
CACHE = os.environ.get("LANGID_BENCH_CLIPS", os.path.join(tempfile.gettempdir(), "langid-bench-clips"))
GOAL_VS_LIMIT = 0.8
GOAL_VS_WRITEUP = 5.0
WORKERS = 2


# ---------------------------------------------------------------- input corpus

def synth_clip(rng: np.random.Generator, rate: int = SOURCE_RATE, seconds: float = CLIP_SECONDS) -> np.ndarray:
    """Speech-like signal: voiced syllables on a gliding pitch, with noise bursts in some gaps."""
    n = int(rate * seconds)
    t = np.arange(n) / rate
    knots = rng.normal(0.0, 0.12, int(seconds * 3) + 2)
    f0 = rng.uniform(90, 230) * np.exp(np.interp(t, np.linspace(0, seconds, len(knots)), knots))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 16))
    voiced_env, noise_env = np.zeros(n), np.zeros(n)
    pos = 0
    while pos < n:
        syllable, gap = int(rng.uniform(0.08, 0.3) * rate), int(rng.uniform(0.02, 0.2) * rate)
        voiced_env[pos:pos + syllable] = np.hanning(syllable)[: n - pos]
        if rng.random() < 0.4:
            noise_env[pos + syllable:pos + syllable + gap] = np.hanning(gap)[: max(0, n - pos - syllable)]
        pos += syllable + gap
    hiss = np.diff(rng.standard_normal(n + 1))  # differenced noise: fricative-like, high-frequency heavy
    x = voiced * voiced_env + 0.3 * hiss * noise_env + 0.002 * rng.standard_normal(n)
    return (0.5 * x / np.max(np.abs(x))).astype(np.float32)


def kaggle_name(index: int, seed: int) -> str:
    """`<lang>_<m|f>_<32hex>.fragment<N>.flac`, a few fragments per recording."""
    recording = index // FRAGMENTS_PER_RECORDING
    language = LANGUAGES[recording % len(LANGUAGES)]
    gender = "mf"[(recording // len(LANGUAGES)) % 2]
    recording_id = hashlib.md5(f"{seed}:{recording}".encode()).hexdigest()
    return f"{language}_{gender}_{recording_id}.fragment{index % FRAGMENTS_PER_RECORDING + 1}.flac"


def write_clip(folder: str, index: int, seed: int) -> None:
    """Clip `index` of the seed's corpus, written under a hidden name and renamed (an interrupted run leaves none
    half-written)."""
    with atomic_output(os.path.join(folder, kaggle_name(index, seed))) as tmp:
        sf.write(tmp, synth_clip(np.random.default_rng([seed, index])), SOURCE_RATE, format="FLAC", subtype="PCM_16")


def make_corpus(root: str, n_files: int, seed: int = 0) -> str:
    """Write n deterministic 10-s 22,050 Hz mono FLAC clips under root/train/train; returns root."""
    folder = os.path.join(root, "train", "train")
    os.makedirs(folder, exist_ok=True)
    for i in range(n_files):
        write_clip(folder, i, seed)
    return root


def cached_corpus(n_files: int, seed: int = 0) -> str:
    """A Kaggle-layout root holding exactly the seed's first n clips, as hard links into the clip cache; clips
    missing from the cache are generated first (in parallel, once: later runs reuse them)."""
    clips = os.path.join(CACHE, f"seed{seed}")
    os.makedirs(clips, exist_ok=True)
    missing = [i for i in range(n_files) if not os.path.exists(os.path.join(clips, kaggle_name(i, seed)))]
    if missing:
        print(f"generating {len(missing)} clips into {clips} (cached for later runs) ...", file=sys.stderr)
        with concurrent.futures.ProcessPoolExecutor(cpu_count()) as pool:
            list(pool.map(write_clip, [clips] * len(missing), missing, [seed] * len(missing), chunksize=50))
    root = os.path.join(CACHE, f"seed{seed}-n{n_files}")
    folder = os.path.join(root, "train", "train")
    if not os.path.isdir(folder) or len(os.listdir(folder)) != n_files:
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(folder)
        for i in range(n_files):
            name = kaggle_name(i, seed)
            try:
                os.link(os.path.join(clips, name), os.path.join(folder, name))
            except OSError:  # another file system
                shutil.copy(os.path.join(clips, name), folder)
    return root


def usable_paths(input_dir: str) -> list[str]:
    """Audio files the job will compute (records that could be described), in discovery order."""
    return [r.path for r in find_sources(input_dir).records if not r.error]


def copy_subset(paths: list[str], root: str) -> str:
    """Copy files (names kept, so discovery sees the same layout) to root/train/train; returns root."""
    folder = os.path.join(root, "train", "train")
    os.makedirs(folder, exist_ok=True)
    for p in paths:
        shutil.copy(p, folder)
    return root


def sample(paths: list[str], n: int) -> list[str]:
    """n paths spread evenly over the list (every language, recording and fragment kind)."""
    if n >= len(paths):
        return list(paths)
    return [paths[i] for i in np.linspace(0, len(paths) - 1, n).round().astype(int)]


# ---------------------------------------------------------------- the write-up loop (baseline)

def writeup_clip(path: str, target: str, times: dict) -> None:
    """One file the write-up's way: librosa.load, mel power in dB, a matplotlib specshow PNG."""
    import librosa
    import librosa.display
    import matplotlib.pyplot as plt

    with stopwatch(times, "load (librosa.load, sr=None)"):
        y, sr = librosa.load(path, sr=None, mono=True)
    with stopwatch(times, "melspectrogram + power_to_db"):
        db = librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=sr), ref=np.max)
    with stopwatch(times, "matplotlib specshow + savefig PNG"):
        plt.figure()
        librosa.display.specshow(db, sr=sr, x_axis="time", y_axis="mel")
        plt.savefig(target)
        plt.close()


def bench_writeup(paths: list[str], out_dir: str) -> dict:
    """Single-process loop over all files, one PNG each; the first file is run once untimed (imports)."""
    import matplotlib
    from threadpoolctl import threadpool_limits

    matplotlib.use("Agg")
    os.makedirs(out_dir, exist_ok=True)
    with threadpool_limits(1):  # one core, like every other single-process row
        writeup_clip(paths[0], os.path.join(out_dir, "warmup.png"), {})
        times, t = {}, {}
        with clocks(t):
            for i, p in enumerate(paths):
                writeup_clip(p, os.path.join(out_dir, f"{i:05d}.png"), times)
    return timing(len(paths), t, times)


def timing(n: int, t: dict, phases: dict) -> dict:
    """Throughput by wall and by CPU time, plus per-phase CPU milliseconds per clip."""
    return {"files": n, "seconds": t["wall"], "cpu_seconds": t["cpu"], "clips_per_s": n / t["wall"],
            "clips_per_cpu_s": n / t["cpu"], "ms_per_clip": {k: 1000 * v / n for k, v in phases.items()}}


# ---------------------------------------------------------------- compute limit and the job without Ray

def limit_clip(path: str, cfg: FeatureConfig, times: dict) -> None:
    """langid's per-clip compute: decode + resample + normalise, then log-mel of every window."""
    with stopwatch(times, "load_audio (decode + resample + normalise)"):
        audio = load_audio(path, cfg.sample_rate, max_seconds=MAX_SECONDS)
    with stopwatch(times, "windows + log_mel"):
        for _, chunk, _ in windows(audio.samples, cfg):
            log_mel(chunk, cfg)


def bench_compute_limit(paths: list[str], cfg: FeatureConfig) -> dict:
    """Compute alone on one core (BLAS held to one thread, as in a Ray worker): no writing, no scheduling.
    Its rate is clips per CPU second: what one core does, whatever else runs on the machine."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        limit_clip(paths[0], cfg, {})
        times, t = {}, {}
        with clocks(t):
            for p in paths:
                limit_clip(p, cfg, times)
    return timing(len(paths), t, times)


def job_batches(input_dir: str, batch_size: int, files: int | None = None) -> list[pa.Table]:
    """The job's records (discovered and split as run_preprocess does; the first `files`) cut into its batches."""
    records = assign_splits(find_sources(input_dir).records)[:files]
    # the clips' names are ASCII: each opens under the name the store keeps
    return [work_table([(r, r.path) for r in records[i:i + batch_size]]) for i in range(0, len(records), batch_size)]


def fresh_store(uri: str, cfg: FeatureConfig) -> str:
    """An empty store at uri (removed first if present)."""
    shutil.rmtree(uri, ignore_errors=True)
    Store(uri).init(cfg)
    return uri


def bench_in_process(input_dir: str, store: str, cfg: FeatureConfig, png: bool, batch_size: int,
                     files: int | None = None) -> dict:
    """The job's own process_batch called in a loop in this process (on the first `files`): its work without Ray."""
    from threadpoolctl import threadpool_limits

    batches = job_batches(input_dir, batch_size, files)
    with threadpool_limits(1):
        process_batch(batches[0].slice(0, 1), fresh_store(store + "-warm", cfg), cfg, png, MAX_SECONDS)
        fresh_store(store, cfg)
        t = {}
        with clocks(t):
            for b in batches:
                process_batch(b, store, cfg, png, MAX_SECONDS)
    return timing(sum(b.num_rows for b in batches), t, {})


# ---------------------------------------------------------------- profile of one process_batch

PROFILE_PHASES = [  # (label, module suffix, function, only when called from)
    ("decode (soundfile FLAC)", "langid/audio.py", "decode", None),
    ("resample (soxr HQ)", "langid/audio.py", "resample", None),
    ("STFT", "langid/features.py", "_stft_power", None),
    ("power to dB", "langid/features.py", "_power_to_db", None),
    ("PNG encode (PIL)", "langid/features.py", "to_png", None),
    ("PNG file writes", "langid/uris.py", "write_atomic", "_write_shard"),
    ("Parquet encode + write", "langid/store.py", "write_shard", None),
]


def cumtime(stats: pstats.Stats, suffix: str, name: str, caller: str | None = None) -> float:
    """Cumulative seconds of a function (optionally only the calls from `caller`) in a profile."""
    total = 0.0
    for (file, _, func), (_, _, _, ct, callers) in stats.stats.items():
        if func != name or not file.replace(os.sep, "/").endswith(suffix):
            continue
        total += ct if caller is None else sum(v[3] for (_, _, f), v in callers.items() if f == caller)
    return total


def profile_batch(input_dir: str, store: str, cfg: FeatureConfig, batch_size: int) -> dict:
    """cProfile (in CPU time) one full batch of process_batch with PNG in this process, after one file untimed
    (imports); ms per clip by phase."""
    from threadpoolctl import threadpool_limits

    batch = job_batches(input_dir, batch_size)[0]
    profiler = cProfile.Profile(time.process_time)
    with threadpool_limits(1):
        process_batch(batch.slice(0, 1), fresh_store(store + "-warm", cfg), cfg, True, MAX_SECONDS)  # imports
        fresh_store(store, cfg)
        t0 = time.process_time()
        profiler.enable()
        process_batch(batch, store, cfg, True, MAX_SECONDS)
        profiler.disable()
        total = time.process_time() - t0
    stats = pstats.Stats(profiler)
    phases = {label: cumtime(stats, *spec) for label, *spec in PROFILE_PHASES}
    load = cumtime(stats, "langid/audio.py", "load_audio")
    mel = cumtime(stats, "langid/features.py", "log_mel")
    features = cumtime(stats, "langid/features.py", "flagged_window_features")
    phases["levels + normalise"] = load - phases["decode (soundfile FLAC)"] - phases["resample (soxr HQ)"]
    phases["mel filterbank + |X|^2 + scaling"] = mel - phases["STFT"] - phases["power to dB"]
    phases["Arrow columns of a file"] = cumtime(stats, "langid/preprocess.py", "process_file") - load - features
    phases["other (windows, glue)"] = total - sum(phases.values())
    n = batch.num_rows
    return {"files": n, "seconds": total,
            "ms_per_clip": {k: 1000 * v / n for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
            "share": {k: v / total for k, v in phases.items()}}


# ---------------------------------------------------------------- the Ray job

class ShardWatch(Poller):
    """Watches a store's shards appear, to tell start-up from the steady rate. It only lists names while the job
    runs (this process is the job's driver: reading shards here would take CPU from the job); `timeline()` reads
    how many files each shard holds afterwards."""

    def __init__(self, store: str):
        super().__init__(0.05)
        self.store = store
        self.seen: dict[str, float] = {}  # shard -> perf_counter when first seen

    def poll(self):
        now = time.perf_counter()
        for table in (WINDOWS, ERRORS):
            try:
                names = os.listdir(os.path.join(self.store, table))
            except OSError:
                continue
            for n in names:  # shards are renamed into place whole, so a visible one is complete
                if n.endswith(".parquet") and not n.startswith("."):
                    self.seen.setdefault(os.path.join(self.store, table, n), now)

    def timeline(self) -> list[tuple[float, int]]:
        """(perf_counter, files recorded by then) at each time shards appeared."""
        import pyarrow.parquet as pq

        files: dict[float, int] = {}
        for path, t in self.seen.items():
            files[t] = files.get(t, 0) + len(set(pq.read_table(path, columns=["path"]).column("path").to_pylist()))
        out, total = [], 0
        for t in sorted(files):
            total += files[t]
            out.append((t, total))
        return out


def steady_rate(timeline: list[tuple[float, int]], files: int) -> float | None:
    """Files/s from the first shard seen to the last; None when under half the files came after the first."""
    if not timeline:
        return None
    (t1, n1), (t2, n2) = timeline[0], timeline[-1]
    if n1 > files / 2 or t2 <= t1 or n2 <= n1:
        return None
    return (n2 - n1) / (t2 - t1)


def cpu_by_role(before: dict[int, float], after: dict[int, float]) -> dict:
    """CPU seconds used meanwhile by this process (the driver), the worker processes, Ray Data's actors and Ray's
    own processes (raylet, GCS, dashboard, agents); processes that ended during the run are missed."""
    roles = {"driver": 0.0, "workers": 0.0, "Ray Data actors": 0.0, "Ray system processes": 0.0}
    for pid, cpu in after.items():
        used = cpu - before.get(pid, 0.0)
        name = _cmdline(pid)
        if pid == os.getpid():
            roles["driver"] += used
        elif name.startswith("ray::_") or "Actor" in name.split(" ")[0]:
            roles["Ray Data actors"] += used
        elif name.startswith("ray::IDLE") or name.startswith("ray::MapBatches"):
            roles["workers"] += used
        else:
            roles["Ray system processes"] += used
    return roles


def bench_ray(input_dir: str, files: int, cfg: FeatureConfig, png: bool, batch_size: int, tmp: str,
              workers: int = WORKERS) -> dict:
    """run_preprocess into a fresh store in a freshly started embedded Ray with `workers` CPUs: the job's wall clock
    (discovery, planning, worker start-up, the work, the last shard), its steady rate, and where the CPU went."""
    import ray

    from langid.runtime import init_ray, quiet_ray_data

    store = os.path.join(tmp, f"store-ray-{workers}-{'png' if png else 'nopng'}")
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    init_ray(num_cpus=workers)
    quiet_ray_data()
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per finished dataset otherwise
    out = {"workers": workers, "png": png, "files": files, "ray_start_s": time.perf_counter() - t0,
           "load_at_start": load_average()}
    try:
        cpu0 = tree_cpu_seconds()
        with ShardWatch(store) as watch:
            t1 = time.perf_counter()
            res = run_preprocess(input_dir, store, cfg, png=png, batch_size=batch_size, progress=False)
            seconds = time.perf_counter() - t1
        cpu = cpu_by_role(cpu0, tree_cpu_seconds())
    finally:
        ray.shutdown()
    if res.failed or res.ok != files:
        print(f"warning: {store}: {res.summary()}", file=sys.stderr)
    timeline = watch.timeline()
    steady = steady_rate(timeline, files)
    out.update(seconds=seconds, clips_per_s=files / seconds, steady_clips_per_s=steady,
               first_output_s=timeline[0][0] - t1 if timeline else None,
               # what the run lost against running at its steady rate from the first second to the last
               startup_and_tail_s=seconds - files / steady if steady else None,
               cpu_seconds=cpu, load_at_end=load_average(), ok=res.ok, failed=res.failed)
    shutil.rmtree(store, ignore_errors=True)
    return out


# ---------------------------------------------------------------- report

def one_process_row(method: str, run: dict, limit_all: float, writeup: dict | None) -> dict:
    """A single-process row: its rate is clips per CPU second (what one core does, whatever the load)."""
    rate = run["clips_per_cpu_s"]
    return {"method": method, "files": run["files"], "clips_per_s": rate, "vs_limit": rate / limit_all,
            "vs_writeup": writeup and rate / writeup["clips_per_cpu_s"]}


def ray_row(run: dict, limit_all: float, writeup: dict | None) -> dict:
    steady = run["steady_clips_per_s"]
    return {"method": f"Ray job run_preprocess, {run['workers']} CPUs, {'PNG' if run['png'] else 'no PNG'}",
            "files": run["files"], "seconds": run["seconds"], "clips_per_s": run["clips_per_s"],
            "vs_limit": run["clips_per_s"] / limit_all, "steady": steady, "steady_vs_limit": steady and steady / limit_all,
            "first_output_s": run["first_output_s"], "startup_s": run["startup_and_tail_s"],
            "vs_writeup": writeup and run["clips_per_s"] / writeup["clips_per_cpu_s"], "load": run["load_at_start"]}


def table_rows(limit: dict, ray_runs: list[dict], in_process: dict, writeup: dict | None, cpus: int) -> list[dict]:
    limit_all = limit["clips_per_cpu_s"] * cpus
    rows = [ray_row(r, limit_all, writeup) for r in ray_runs]
    rows += [one_process_row("compute limit, 1 core: load_audio + windows + log_mel, no writing", limit, limit_all,
                             writeup),
             {"method": f"compute limit, {cpus} cores (1 core × {cpus})", "clips_per_s": limit_all, "vs_limit": 1.0,
              "vs_writeup": writeup and limit_all / writeup["clips_per_cpu_s"]}]
    for png, run in in_process.items():
        rows.append(one_process_row(f"process_batch in a loop, no Ray, 1 core, {'PNG' if png else 'no PNG'}", run,
                                    limit_all, writeup))
    if writeup:
        rows.append(one_process_row("write-up loop: librosa.load + melspectrogram + matplotlib PNG, 1 core",
                                    writeup, limit_all, writeup))
    return rows


def goals(ray_runs: list[dict], limit_all: float, writeup: dict | None) -> list[str]:
    """PASS/MISS lines: the best no-PNG run end to end against the limit; the PNG run against the write-up loop."""
    lines = []
    main = [r for r in ray_runs if not r["png"]]
    if main:
        best = max(main, key=lambda r: r["clips_per_s"])
        ratio = best["clips_per_s"] / limit_all
        lines.append(f"{'PASS' if ratio >= GOAL_VS_LIMIT else 'MISS'}: end to end, {best['files']} clips, "
                     f"{best['workers']} CPUs: {ratio:.2f}× the compute limit measured in this run (goal ≥ "
                     f"{GOAL_VS_LIMIT:g}×; best of {len(main)} run(s), load {best['load_at_start']} at its start)")
    for r in (r for r in ray_runs if r["png"] and writeup):
        ratio = r["clips_per_s"] / writeup["clips_per_cpu_s"]
        lines.append(f"{'PASS' if ratio >= GOAL_VS_WRITEUP else 'MISS'}: with PNG, {ratio:.1f}× the write-up loop "
                     f"(goal ≥ {GOAL_VS_WRITEUP:g}×)")
    return lines or ["no Ray run: goals not evaluated"]


def phase_list(title: str, ms: dict) -> str:
    """A Markdown bullet list of milliseconds per clip by phase."""
    total = sum(v for v in ms.values() if v > 0) or 1.0
    items = [f"  - {k}: {v:.1f} ms ({100 * v / total:.0f} %)" for k, v in ms.items()]
    return "\n".join([f"- {title}"] + items)


COLUMNS = [("method", "method"), ("files", "clips"), ("seconds", "wall s"), ("clips_per_s", "clips/s"),
           ("vs_limit", "× limit"), ("steady", "steady clips/s"), ("steady_vs_limit", "× limit"),
           ("first_output_s", "1st shard s"), ("startup_s", "start-up + tail s"), ("vs_writeup", "× write-up"),
           ("load", "load at start")]


def report(facts: dict, rows: list[dict], goal_lines: list[str], detail: dict) -> str:
    """The whole Markdown report."""
    parts = ["# Preprocessing throughput", "", facts_line(facts), "", markdown_table(rows, COLUMNS), "",
             "Ray rows: clips per wall second of run_preprocess (discovery, split, Ray Data planning, worker "
             "start-up, every task, the last shard) in an embedded Ray started just before (its start is not in the "
             "row; see below). Steady: first shard to last. Start-up + tail: the row's wall seconds minus the "
             "clips at the steady rate. Single-process rows: clips per CPU second of this process (one core's "
             "rate, insensitive to other users of the machine). Ratios divide by the compute limit × cores.", "",
             "## Goals", "", *[f"- {g}" for g in goal_lines], "", "## Where the CPU went during the Ray runs", ""]
    for r in detail["ray"]:
        if r["cpu_seconds"]:
            split = ", ".join(f"{k} {v:.1f} s" for k, v in r["cpu_seconds"].items())
            total = sum(r["cpu_seconds"].values())
            parts.append(f"- {r['files']} clips, {'PNG' if r['png'] else 'no PNG'}: {split}; "
                         f"{1000 * total / r['files']:.1f} CPU ms per clip in all, "
                         f"{1000 * r['cpu_seconds']['workers'] / r['files']:.1f} in the workers "
                         f"(the limit: {1000 / detail['limit']['clips_per_cpu_s']:.1f}); Ray start "
                         f"{r['ray_start_s']:.1f} s; load {r['load_at_start']} → {r['load_at_end']}")
    parts += ["", "## Where the time goes (CPU ms per clip, one core)", "",
              phase_list(f"compute limit (1 core, {detail['limit']['files']} clips)", detail["limit"]["ms_per_clip"])]
    if detail.get("profile"):
        p = detail["profile"]
        parts.append(phase_list(f"one process_batch with PNG, cProfile in CPU time, {p['files']} files",
                                p["ms_per_clip"]))
    if detail.get("writeup"):
        parts.append(phase_list("write-up loop", detail["writeup"]["ms_per_clip"]))
    parts += ["", f"Notes: the compute limit is measured on {detail['limit']['files']} of the clips spread over the "
              f"corpus, before the Ray runs ({detail['limit_before']['clips_per_cpu_s']:.1f} clips/CPU-s) and after "
              f"them ({detail['limit_after']['clips_per_cpu_s']:.1f}); the rows use the mean. The write-up loop keeps "
              "the source rate (22,050 Hz) and librosa's defaults (n_fft 2048, hop 512, 128 mels) and draws a "
              "default-size matplotlib figure (640×480) with axes; langid resamples to 16 kHz and computes 64 mels "
              "with n_fft 400, hop 160. The machine is shared, so numbers carry noise (see the loads)."]
    return "\n".join(parts)


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--clips", type=int, default=5000, help="clips in the Ray runs (default %(default)s)")
    p.add_argument("--input", help="use the audio under this folder instead of generated clips (its first --clips)")
    p.add_argument("--repeat", type=int, default=1, help="times to run the main (no PNG) Ray job (default 1)")
    p.add_argument("--sample", type=int, default=300,
                   help="clips for the single-process figures: compute limit, loops (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="files per Ray task, as the job's default (%(default)s)")
    p.add_argument("--quick", action="store_true", help="100 clips, no PNG run, no write-up loop, no profile")
    p.add_argument("--no-png", action="store_true", help="skip the Ray run with PNGs")
    p.add_argument("--no-writeup", action="store_true", help="skip the write-up's librosa + matplotlib loop")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile of one process_batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated clips (default %(default)s)")
    a = p.parse_args(argv)
    if a.quick:
        a.clips, a.sample, a.no_png, a.no_writeup, a.no_profile = 100, 50, True, True, True
    if a.clips < 1 or a.sample < 1 or a.repeat < 1:
        p.error("--clips, --sample and --repeat must be positive")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)  # embedded Ray on this machine: that is what is measured
    cfg = FeatureConfig()
    tmp = tempfile.mkdtemp(prefix="langid-bench-")
    try:
        if a.input:
            paths = usable_paths(a.input)[: a.clips]
            input_dir = copy_subset(paths, os.path.join(tmp, "input")) if len(paths) < len(usable_paths(a.input)) \
                else a.input
        else:
            input_dir = cached_corpus(a.clips, a.seed)
        paths = usable_paths(input_dir)
        if not paths:
            print(f"{input_dir}: no usable audio files found", file=sys.stderr)
            return 2
        some = sample(paths, a.sample)
        audio_s = sum(sf.info(p).duration for p in some) * len(paths) / len(some)
        facts = machine_facts(files=len(paths), audio_seconds=round(audio_s), batch_size=a.batch_size,
                              input=a.input or f"generated ({len(paths)} × {CLIP_SECONDS:g} s, {SOURCE_RATE} Hz "
                                                f"mono FLAC, cached in {CACHE})",
                              loadavg_at_start=" ".join(f"{x:.2f}" for x in os.getloadavg()))
        cpus = min(facts["cpus"], WORKERS)
        print(f"compute limit on {len(some)} clips ...", file=sys.stderr)
        limit_before = bench_compute_limit(some, cfg)
        ray_runs = []
        for i in range(a.repeat):
            print(f"Ray job, {len(paths)} clips, no PNG ({i + 1}/{a.repeat}) ...", file=sys.stderr)
            ray_runs.append(bench_ray(input_dir, len(paths), cfg, False, a.batch_size, tmp, cpus))
        if not a.no_png:
            print(f"Ray job, {len(paths)} clips, PNG ...", file=sys.stderr)
            ray_runs.append(bench_ray(input_dir, len(paths), cfg, True, a.batch_size, tmp, cpus))
        print("compute limit again ...", file=sys.stderr)
        limit_after = bench_compute_limit(some, cfg)
        limit = {**limit_before, "clips_per_cpu_s": (limit_before["clips_per_cpu_s"] + limit_after["clips_per_cpu_s"]) / 2}
        print("process_batch without Ray ...", file=sys.stderr)
        in_process = {png: bench_in_process(input_dir, os.path.join(tmp, f"store-local-{png}"), cfg, png,
                                            a.batch_size, len(some)) for png in (False, True)}
        writeup = None
        if not a.no_writeup:
            print("write-up loop ...", file=sys.stderr)
            writeup = bench_writeup(some[:100], os.path.join(tmp, "writeup-png"))
        profile = None
        if not a.no_profile:
            print("profiling one process_batch ...", file=sys.stderr)
            profile = profile_batch(input_dir, os.path.join(tmp, "store-profile"), cfg, a.batch_size)
        facts["loadavg_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        rows = table_rows(limit, ray_runs, in_process, writeup, cpus)
        goal_lines = goals(ray_runs, limit["clips_per_cpu_s"] * cpus, writeup)
        detail = {"limit": limit, "limit_before": limit_before, "limit_after": limit_after, "ray": ray_runs,
                  "in_process": {str(k): v for k, v in in_process.items()}, "writeup": writeup, "profile": profile}
        markdown = report(facts, rows, goal_lines, detail)
        print(markdown)
        md, js = write_results("preprocess", markdown,
                               {"facts": facts, "rows": rows, "goals": goal_lines, "detail": detail})
        print(f"\nwritten: {md}, {js}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
