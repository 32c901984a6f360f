#!/usr/bin/env python
"""Preprocessing throughput: the write-up's librosa + matplotlib loop, the compute limit, and the Ray job.

All methods run in one invocation on the same files:
    python benchmarks/preprocess.py                  # 200 generated 10-s FLAC clips
    python benchmarks/preprocess.py --quick          # 20 clips, a smoke check
    python benchmarks/preprocess.py --input demo/corpus --workers 1,2
Results: a Markdown table on stdout and in benchmarks/results/preprocess.{md,json}.
"""
from __future__ import annotations

import argparse
import cProfile
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

from common import (clocks, cpu_used_since, facts_line, load_average, machine_facts, markdown_table, stopwatch,
                    tree_cpu_seconds, write_results)

from langid.audio import load_audio
from langid.config import FeatureConfig
from langid.features import log_mel, windows
from langid.preprocess import process_batch, run_preprocess
from langid.sources import assign_splits, discover
from langid.store import Store

SOURCE_RATE = 22050
CLIP_SECONDS = 10.0
LANGUAGES = ("de", "en", "es")
FRAGMENTS_PER_RECORDING = 5
MAX_SECONDS = 4 * 3600.0
GOAL_VS_WRITEUP = 5.0
GOAL_VS_LIMIT = 0.5


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


def make_corpus(root: str, n_files: int, seed: int = 0) -> str:
    """Write n deterministic 10-s 22,050 Hz mono FLAC clips under root/train/train; returns root."""
    folder = os.path.join(root, "train", "train")
    os.makedirs(folder, exist_ok=True)
    for i in range(n_files):
        clip = synth_clip(np.random.default_rng([seed, i]))
        sf.write(os.path.join(folder, kaggle_name(i, seed)), clip, SOURCE_RATE, format="FLAC", subtype="PCM_16")
    return root


def usable_paths(input_dir: str) -> list[str]:
    """Audio files the job will compute (records that could be described), in discovery order."""
    return [r["path"] for r in discover(input_dir) if not r.get("error")]


def copy_subset(paths: list[str], root: str) -> str:
    """Copy files (names kept, so discovery sees the same layout) to root/train/train; returns root."""
    folder = os.path.join(root, "train", "train")
    os.makedirs(folder, exist_ok=True)
    for p in paths:
        shutil.copy(p, folder)
    return root


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
    """Compute alone on one core (BLAS held to one thread, as in a Ray worker): no writing, no scheduling."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        limit_clip(paths[0], cfg, {})
        times, t = {}, {}
        with clocks(t):
            for p in paths:
                limit_clip(p, cfg, times)
    return timing(len(paths), t, times)


def job_batches(input_dir: str, batch_size: int) -> list[pa.Table]:
    """The job's records (discovered and split as run_preprocess does) cut into its batches."""
    records = assign_splits(discover(input_dir))
    return [pa.Table.from_pylist(records[i:i + batch_size]) for i in range(0, len(records), batch_size)]


def fresh_store(uri: str, cfg: FeatureConfig) -> str:
    """An empty store at uri (removed first if present)."""
    shutil.rmtree(uri, ignore_errors=True)
    Store(uri).init(cfg)
    return uri


def bench_in_process(input_dir: str, store: str, cfg: FeatureConfig, png: bool, batch_size: int) -> dict:
    """The job's own process_batch called in a loop in this process: the job's work without Ray."""
    from threadpoolctl import threadpool_limits

    batches = job_batches(input_dir, batch_size)
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
    ("STFT (librosa.stft)", "librosa/core/spectrum.py", "stft", "log_mel"),
    ("power_to_db", "librosa/core/spectrum.py", "power_to_db", "log_mel"),
    ("PNG encode (PIL)", "langid/features.py", "to_png", None),
    ("PNG file writes", "langid/uris.py", "write_atomic", "process_batch"),
    ("Arrow table build", "langid/preprocess.py", "_window_table", None),
    ("Parquet encode + write (zstd)", "langid/store.py", "write_shard", None),
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
    """cProfile (in CPU time) one full batch of process_batch with PNG in this process; ms per clip by phase."""
    from threadpoolctl import threadpool_limits

    batch = job_batches(input_dir, batch_size)[0]
    profiler = cProfile.Profile(time.process_time)
    with threadpool_limits(1):
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
    phases["levels + normalise"] = load - phases["decode (soundfile FLAC)"] - phases["resample (soxr HQ)"]
    phases["mel filterbank + |X|^2 + scaling"] = mel - phases["STFT (librosa.stft)"] - phases["power_to_db"]
    phases["other (windows, rows, glue)"] = total - sum(phases.values())
    n = batch.num_rows
    return {"files": n, "seconds": total,
            "ms_per_clip": {k: 1000 * v / n for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
            "share": {k: v / total for k, v in phases.items()}}


# ---------------------------------------------------------------- the Ray job

def timed_job(input_dir: str, store: str, cfg: FeatureConfig, png: bool, batch_size: int) -> dict:
    """run_preprocess into a fresh store: wall seconds (discovery, tasks, writing; not Ray start-up), CPU
    seconds of this process and all of Ray's meanwhile, and how many processes (cold workers) started."""
    shutil.rmtree(store, ignore_errors=True)
    cpu0, t0 = tree_cpu_seconds(), time.perf_counter()
    res = run_preprocess(input_dir, store, cfg, png=png, batch_size=batch_size, progress=False)
    seconds, cpu = time.perf_counter() - t0, cpu_used_since(cpu0)
    if res.failed or not res.ok:
        print(f"warning: {store}: {res.summary()}", file=sys.stderr)
    started = len(set(tree_cpu_seconds() or {}) - set(cpu0 or {})) if cpu0 is not None else None
    return {"seconds": seconds, "cpu_seconds": cpu, "processes_started": started}


def warm_every_worker(path: str, workers: int, tmp: str, cfg: FeatureConfig) -> int:
    """Run process_batch on one file in `workers` concurrent 1-CPU tasks, so each lands on its own worker
    and pays its imports now; returns how many distinct worker processes ran them."""
    import ray

    barrier = os.path.join(tmp, f"warm-barrier-{workers}")
    os.makedirs(barrier, exist_ok=True)

    @ray.remote(num_cpus=1)
    def warm(index: int) -> int:
        store = fresh_store(os.path.join(tmp, f"store-warm-worker-{index}"), cfg)
        process_batch(pa.Table.from_pylist([{"path": path}]), store, cfg, True, MAX_SECONDS)
        # hold the slot until every task has started, so none runs on a worker another task warmed
        open(os.path.join(barrier, str(index)), "w").close()
        deadline = time.monotonic() + 120
        while len(os.listdir(barrier)) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
        return os.getpid()

    return len(set(ray.get([warm.remote(i) for i in range(workers)])))


def warm_up(paths: list[str], workers: int, tmp: str, cfg: FeatureConfig) -> dict:
    """A cold one-file job, a warm-up task on every worker, then the one-file job again, warm."""
    one = copy_subset(paths[:1], os.path.join(tmp, "warm-one"))
    cold = timed_job(one, os.path.join(tmp, "store-warm-cold"), cfg, True, 1)["seconds"]
    warmed = warm_every_worker(paths[0], workers, tmp, cfg)
    warm = timed_job(one, os.path.join(tmp, "store-warm-again"), cfg, True, 1)["seconds"]
    return {"cold_first_job_s": cold, "warm_one_file_job_s": warm, "first_use_cost_s": cold - warm,
            "workers_warmed": warmed}


def bench_ray(input_dir: str, paths: list[str], workers: int, tmp: str, cfg: FeatureConfig, batch_size: int) -> dict:
    """Start Ray embedded with `workers` CPUs, warm it up, then time the job with and without PNG."""
    import ray

    from langid.runtime import init_ray, quiet_ray_data

    t0 = time.perf_counter()
    init_ray(num_cpus=workers)
    quiet_ray_data()
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per finished dataset otherwise
    out = {"workers": workers, "ray_start_s": time.perf_counter() - t0}
    try:
        out["warm_up"] = warm_up(paths, workers, tmp, cfg)
        for png in (True, False):
            run = timed_job(input_dir, os.path.join(tmp, f"store-ray-{workers}-{png}"), cfg, png, batch_size)
            run["clips_per_s"] = len(paths) / run["seconds"]
            run["cpu_ms_per_clip"] = run["cpu_seconds"] and 1000 * run["cpu_seconds"] / len(paths)
            out["png" if png else "no_png"] = run
    finally:
        ray.shutdown()
    return out


# ---------------------------------------------------------------- report

def one_process_row(method: str, run: dict) -> dict:
    """A single-process row: its rate is clips per CPU second (what one core does, whatever the load)."""
    return {"method": method, "clips_per_s": run["clips_per_cpu_s"], "wall_clips_per_s": run["clips_per_s"],
            "seconds": run["seconds"]}


def table_rows(writeup: dict, limit: dict, in_process: dict, ray_runs: list[dict], cpus: int) -> list[dict]:
    """Rows of the results table, each with its ratios to the write-up loop and to the machine limit."""
    limit_all = limit["clips_per_cpu_s"] * cpus
    rows = [
        one_process_row("write-up loop: librosa.load + melspectrogram + matplotlib PNG, 1 process", writeup),
        one_process_row("compute limit, 1 core: load_audio + windows + log_mel, no writing", limit),
        {"method": f"compute limit, {cpus} cores (1 core × {cpus})", "clips_per_s": limit_all},
    ]
    for png, run in in_process.items():
        rows.append(one_process_row(f"process_batch in a loop, no Ray, 1 core, {'PNG' if png else 'no PNG'}", run))
    for r in ray_runs:
        for key, label in (("png", "PNG"), ("no_png", "no PNG")):
            rows.append({"method": f"Ray job run_preprocess, {r['workers']} worker{'s' * (r['workers'] > 1)}, {label}",
                         "clips_per_s": r[key]["clips_per_s"], "wall_clips_per_s": r[key]["clips_per_s"],
                         "seconds": r[key]["seconds"]})
    for row in rows:
        row["vs_writeup"] = row["clips_per_s"] / writeup["clips_per_cpu_s"]
        row["vs_limit"] = row["clips_per_s"] / limit_all
    return rows


def goals(ray_runs: list[dict], writeup: dict, limit_all: float) -> list[str]:
    """PASS/MISS lines for the targets, judged on the run with the most workers."""
    if not ray_runs:
        return ["no Ray run: goals not evaluated"]
    best = max(ray_runs, key=lambda r: r["workers"])
    lines = []
    for key, label in (("png", "with PNG (like for like)"), ("no_png", "without PNG")):
        cps = best[key]["clips_per_s"]
        for name, ratio, target in (("write-up loop", cps / writeup["clips_per_cpu_s"], GOAL_VS_WRITEUP),
                                    ("compute limit", cps / limit_all, GOAL_VS_LIMIT)):
            verdict = "PASS" if ratio >= target else "MISS"
            lines.append(f"{verdict}: Ray job, {best['workers']} workers, {label}: {ratio:.2f}× the {name} "
                         f"(goal ≥ {target:g}×)")
    return lines


def phase_list(title: str, ms: dict) -> str:
    """A Markdown bullet list of milliseconds per clip by phase."""
    total = sum(v for v in ms.values() if v > 0) or 1.0
    items = [f"  - {k}: {v:.1f} ms ({100 * v / total:.0f} %)" for k, v in ms.items()]
    return "\n".join([f"- {title}"] + items)


def report(facts: dict, rows: list[dict], goal_lines: list[str], detail: dict) -> str:
    """The whole Markdown report."""
    columns = [("method", "method"), ("clips_per_s", "clips/s"), ("wall_clips_per_s", "wall clips/s"),
               ("vs_writeup", "× write-up loop"),
               ("vs_limit", f"× limit ({facts['cpus']} cores)"), ("seconds", "wall s")]
    parts = ["# Preprocessing throughput", "", facts_line(facts), "", markdown_table(rows, columns), "",
             "clips/s: single-process rows count clips per CPU second of this process (one core's rate, "
             "insensitive to other users of the machine); Ray rows count clips per wall second of the whole job, "
             "as a user sees it. Ratios use these rates. Wall clips/s is shown for every row.", "",
             "## Goals", "", *[f"- {g}" for g in goal_lines], "",
             "## Where the time goes (CPU ms per clip, one core)", "",
             phase_list("write-up loop", detail["writeup"]["ms_per_clip"]),
             phase_list("compute limit (1 core)", detail["limit"]["ms_per_clip"])]
    if detail.get("profile"):
        p = detail["profile"]
        title = f"one process_batch with PNG, cProfile in CPU time, {p['files']} files"
        parts.append(phase_list(title, p["ms_per_clip"]))
    parts += ["", "## CPU ms per clip: the job's work alone vs the Ray job", "",
              "(Ray job: CPU of this process and all of Ray's (raylet, GCS, workers); processes that ended "
              "during the run are missed)", ""]
    for png, run in detail["in_process"].items():
        parts.append(f"- process_batch without Ray, {'PNG' if png == 'True' else 'no PNG'}: "
                     f"{1000 * run['cpu_seconds'] / run['files']:.1f} ms")
    for r in detail["ray"]:
        for key, label in (("png", "PNG"), ("no_png", "no PNG")):
            if r[key]["cpu_ms_per_clip"] is not None:
                parts.append(f"- Ray job, {r['workers']} worker(s), {label}: {r[key]['cpu_ms_per_clip']:.1f} ms")
    parts += ["", "## Ray start-up and warm-up (not in the timed runs)", ""]
    for r in detail["ray"]:
        w = r["warm_up"]
        parts.append(f"- {r['workers']} worker(s): ray.init {r['ray_start_s']:.1f} s; cold first job (1 file) "
                     f"{w['cold_first_job_s']:.2f} s vs the same job warm {w['warm_one_file_job_s']:.2f} s "
                     f"(first use of a worker: +{w['first_use_cost_s']:.2f} s); workers warmed: {w['workers_warmed']}; "
                     f"processes started during the timed runs: "
                     f"{r['png']['processes_started']} (PNG), {r['no_png']['processes_started']} (no PNG)")
    parts += ["", "Notes: the write-up loop keeps the source rate (22,050 Hz) and librosa's defaults "
              "(n_fft 2048, hop 512, 128 mels) and draws a default-size matplotlib figure (640×480) with axes; "
              "langid resamples to 16 kHz and computes 64 mels with n_fft 400, hop 160. "
              "The machine is shared, so numbers carry noise (see load average)."]
    return "\n".join(parts)


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--files", type=int, default=200, help="clips to generate (default %(default)s)")
    p.add_argument("--input", help="use the audio under this folder or manifest instead of generating clips")
    p.add_argument("--workers", default="1,2", help="comma-separated Ray CPU counts to run (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="files per Ray task, as the job's default (%(default)s)")
    p.add_argument("--quick", action="store_true", help="20 files: a smoke check, not a measurement")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile of one process_batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated clips (default %(default)s)")
    a = p.parse_args(argv)
    try:
        a.workers = sorted({int(w) for w in a.workers.split(",") if w.strip()})
    except ValueError:
        p.error(f"--workers: expected numbers like 1,2, got {a.workers!r}")
    if a.quick:
        a.files = 20
    if a.files < 1 or any(w < 1 for w in a.workers):
        p.error("--files and --workers must be positive")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)  # embedded Ray on this machine: that is what is measured
    cfg = FeatureConfig()
    tmp = tempfile.mkdtemp(prefix="langid-bench-")
    try:
        if a.input:
            input_dir = a.input
        else:
            print(f"generating {a.files} clips in {tmp}/corpus ...", file=sys.stderr)
            input_dir = make_corpus(os.path.join(tmp, "corpus"), a.files, a.seed)
        paths = usable_paths(input_dir)
        if a.quick:
            paths = paths[: a.files]
            if a.input:  # the job reads the whole folder: give it exactly the files the loops use
                input_dir = copy_subset(paths, os.path.join(tmp, "quick-input"))
        if not paths:
            print(f"{input_dir}: no usable audio files found", file=sys.stderr)
            return 2
        audio_s = sum(sf.info(p).duration for p in paths)
        facts = machine_facts(files=len(paths), audio_seconds=round(audio_s, 1), batch_size=a.batch_size,
                              input=a.input or f"generated ({a.files} × {CLIP_SECONDS:g} s, {SOURCE_RATE} Hz FLAC)")
        cpus = facts["cpus"]
        print("write-up loop ...", file=sys.stderr)
        writeup = bench_writeup(paths, os.path.join(tmp, "writeup-png"))
        print("compute limit ...", file=sys.stderr)
        limit = bench_compute_limit(paths, cfg)
        print("process_batch without Ray ...", file=sys.stderr)
        in_process = {png: bench_in_process(input_dir, os.path.join(tmp, f"store-local-{png}"), cfg, png, a.batch_size)
                      for png in (True, False)}
        ray_runs = []
        for w in a.workers:
            print(f"Ray job, {w} worker(s) ...", file=sys.stderr)
            ray_runs.append(bench_ray(input_dir, paths, w, tmp, cfg, a.batch_size))
        profile = None
        if not a.no_profile:
            print("profiling one process_batch ...", file=sys.stderr)
            profile = profile_batch(input_dir, os.path.join(tmp, "store-profile"), cfg, a.batch_size)
        facts["load_at_end"] = load_average()
        rows = table_rows(writeup, limit, in_process, ray_runs, cpus)
        goal_lines = goals(ray_runs, writeup, limit["clips_per_cpu_s"] * cpus)
        detail = {"writeup": writeup, "limit": limit, "in_process": {str(k): v for k, v in in_process.items()},
                  "ray": ray_runs, "profile": profile}
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
