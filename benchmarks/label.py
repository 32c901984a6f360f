#!/usr/bin/env python
"""Labeling throughput and memory: the Ray job (run_label) against the network's own forward-pass limit.

Throughput (the default) measures, on the same machine and in the same run:
  * the limit: the network's batched forward pass alone (`logprobs`), in this process, on the windows of a sample
    of the very clips the job labels (decoded and featurized beforehand, as the job's decoding tasks do), with the
    job's backend (ONNX Runtime), one thread (the one CPU the job's actor reserves) and the job's batch (16); also
    2 threads and the torch backend. Measured before the jobs, and again (ONNX, 1 thread) after them;
  * the job: run_label, as a user runs it (defaults: 1 model actor of 1 CPU and 2 threads, decoding in tasks), in a
    freshly started embedded Ray, on the first 2,000 and the first 10,000 of a cache of generated 10-s 22,050 Hz
    mono FLAC clips (the Kaggle set's kind, named as it), given as @list files; and on 10 generated files of 60 s.
    Reported: wall s, files/s and its ratio to the limit; time to the first rows (start-up); the steady rate from
    the first rows to the last and its ratio; the tail (publishing); where the CPU went, per process role.
With --memory it instead labels 1,000 and 10,000 one-second files (hard links to one clip per 50,000 files, given
as an @list) and samples the resident memory of this process plus every Ray process it started.

    python benchmarks/label.py                 # 2,000 and 10,000 clips of 10 s + 10 files of 60 s
    python benchmarks/label.py --quick         # a smoke run (50 clips), not a measurement
    python benchmarks/label.py --memory        # peak RSS at 1,000 and 10,000 files
    python benchmarks/label.py --profile       # also py-spy on the model actor and a decoding task (10,000 run)
The clips are cached in $LANGID_BENCH_CLIPS (default /tmp/langid-bench-clips/seed0, shared with
benchmarks/preprocess.py, which writes the same clips): the first run writes the missing ones (10,000 clips:
2.4 GB, many minutes on 2 cores); later runs reuse them. Before measuring, the run waits (up to 10 min) for the
1-minute load average to drop to --max-load (the machine is shared); the loads are recorded.
The model is a resnet18 LangIdNet with random weights: throughput does not depend on training.
Results: a Markdown table on stdout and in benchmarks/results/label.{md,json} (label-memory.* for --memory).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import suppress

import numpy as np
import psutil
import soundfile as sf

from common import (CpuByRole, Poller, RowClock, cpu_count, facts_line, load_averages, machine_facts,
                    markdown_table, process_tree, wait_for_quiet, write_results)

from langid.config import FeatureConfig

GOAL_VS_LIMIT = 0.8
LABELS = ["de", "en", "es"]
SOURCE_RATE = 22050
MB = 1 << 20


# ---------------------------------------------------------------- inputs and model

def synth(rng: np.random.Generator, seconds: float, rate: int = SOURCE_RATE) -> np.ndarray:
    """Speech-like enough for timing: voiced pulses on a gliding pitch, pauses, a little noise."""
    n = int(rate * seconds)
    t = np.arange(n) / rate
    f0 = rng.uniform(90, 230) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 10))
    envelope = (np.sin(2 * np.pi * rng.uniform(2, 5) * t) > -0.3).astype(np.float64)
    x = voiced * envelope + 0.01 * rng.standard_normal(n)
    return (0.5 * x / np.max(np.abs(x))).astype(np.float32)


def make_clips(folder: str, n: int, seconds: float, seed: int) -> float:
    """n FLAC files of `seconds` (22,050 Hz mono) in folder; returns the audio seconds written."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        sf.write(os.path.join(folder, f"clip{i:05d}.flac"), synth(np.random.default_rng([seed, i]), seconds),
                 SOURCE_RATE, format="FLAC", subtype="PCM_16")
    return n * seconds


def cached_clips(n: int, seed: int = 0) -> list[str]:
    """Paths of the seed's first n clips of the clip cache benchmarks/preprocess.py keeps (10-s 22,050 Hz mono FLAC,
    Kaggle names, the same bytes whichever benchmark wrote them); missing ones are written first, in parallel."""
    from preprocess import CACHE, kaggle_name, write_clip  # the cache's owner: one generator for both benchmarks

    folder = os.path.join(CACHE, f"seed{seed}")
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, kaggle_name(i, seed)) for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not os.path.exists(p)]
    if missing:
        print(f"writing {len(missing):,} clips into {folder} (cached for later runs) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with concurrent.futures.ProcessPoolExecutor(cpu_count()) as pool:
            list(pool.map(write_clip, [folder] * len(missing), missing, [seed] * len(missing), chunksize=50))
        print(f"  written in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return paths


def write_list(paths: list[str], listing: str) -> str:
    """An @list input of `paths`; returns the input spec."""
    with open(listing, "w", encoding="utf-8") as f:
        f.writelines(p + "\n" for p in paths)
    return "@" + listing


def random_model(folder: str, cfg: FeatureConfig, labels: list[str] = LABELS, arch: str = "resnet18") -> str:
    """A model folder as training leaves it (weights, metadata, model.onnx), with random weights."""
    import torch

    from langid.artifact import save_model
    from langid.model import LangIdNet
    from langid.onnxmodel import export_folder

    torch.manual_seed(0)
    model = LangIdNet(arch, len(labels), input_shape=cfg.shape).eval()
    save_model(model, folder, labels, cfg, extra={})
    export_folder(model, folder, cfg.shape)
    return folder


def job_defaults() -> dict:
    """The label job's defaults a user gets (LabelJob's fields): backend, actors, CPUs per actor, batch."""
    from langid.labeling import LabelJob, actor_threads

    fields = {f.name: f.default for f in dataclasses.fields(LabelJob) if f.default is not dataclasses.MISSING}
    out = {k: fields[k] for k in ("backend", "actors", "cpus_per_actor", "cpus_per_task", "batch_size")}
    return {**out, "threads_per_actor": actor_threads(LabelJob("", "", ""))}


# ---------------------------------------------------------------- the limit

def clip_windows(paths: list[str], cfg: FeatureConfig) -> np.ndarray:
    """The windows of these files exactly as the job's decoding tasks make them (load_audio + window_features)."""
    from langid.audio import load_audio
    from langid.features import window_features

    audios = [load_audio(p, cfg.sample_rate) for p in paths]
    return np.concatenate([window_features(a.samples, cfg, source_dbfs=a.rms_dbfs)[0] for a in audios])


def time_forward(model_dir: str, specs: np.ndarray, backend: str, threads: int, batch: int, passes: int) -> dict:
    """The fastest of `passes` timed passes of logprobs over `specs` (after a warm-up batch), with the model
    loaded for that thread count (ONNX Runtime fixes it at load time; torch's is set around the call)."""
    import torch

    from langid.inference import load_model

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ident = load_model(model_dir, "cpu", threads=threads, backend=backend)
        assert ident.backend == backend, ident.backend
        ident.logprobs(specs[:batch], batch)  # warm-up: allocations, kernels
        best = None
        for _ in range(passes):
            w0, c0 = time.perf_counter(), time.process_time()
            ident.logprobs(specs, batch)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            if best is None or wall < best[0]:
                best = (wall, cpu)
    finally:
        torch.set_num_threads(before)
    wall, cpu = best
    return {"backend": backend, "threads": threads, "batch": batch, "windows": len(specs), "passes": passes,
            "wall": wall, "cpu": cpu, "windows_per_s": len(specs) / wall, "ms_per_window": 1000 * wall / len(specs),
            "load": load_averages()}


def bench_limit(model_dir: str, specs: np.ndarray, batch: int, passes: int, torch_windows: int) -> list[dict]:
    """The forward pass alone: ONNX Runtime with 1 and 2 threads, then torch (reference) with 1 and 2."""
    rows = []
    for backend in ("onnx", "torch"):
        for threads in (1, 2):
            x = specs if backend == "onnx" else specs[:torch_windows]
            rows.append(time_forward(model_dir, x, backend, threads, batch, passes if backend == "onnx" else 1))
            print(f"  limit {backend} {threads} thread(s): {rows[-1]['windows_per_s']:.1f} windows/s "
                  f"(load {rows[-1]['load']})", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------- memory of the process tree

def tree_rss() -> int:
    """Bytes resident in this process and all its descendants (the embedded Ray's GCS, raylet, workers)."""
    total = 0
    for p in process_tree():
        with suppress(psutil.Error):  # the process ended meanwhile
            total += p.memory_info().rss
    return total


class PeakSampler(Poller):
    """Samples tree_rss() every `every` seconds in a thread; .peak after the block."""

    def __init__(self, every: float = 0.25):
        super().__init__(every)
        self.peak, self.samples = 0, 0

    def poll(self):
        self.peak = max(self.peak, tree_rss())
        self.samples += 1

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.peak = max(self.peak, tree_rss())


# ---------------------------------------------------------------- the job

def fresh_ray(num_cpus) -> tuple[float, int]:
    """Shut down this process's Ray if any and start a new embedded one, as a user's `langid label` does; returns
    (seconds it took, its CPUs)."""
    import ray

    from langid.runtime import init_ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    init_ray(num_cpus=num_cpus, verbose=False)
    return time.perf_counter() - t0, int(ray.cluster_resources().get("CPU", 0))


class Spy(Poller):
    """py-spy record (raw collapsed stacks, `seconds` long, non-blocking) on the model actor and one decoding task's
    worker, started once `clock` has seen `after_rows` rows; `.reports` afterwards: per process, the busy share
    (samples of active threads / samples possible) and the functions holding the most samples."""

    def __init__(self, clock: RowClock, after_rows: int, folder: str, seconds: float = 10.0, rate: int = 50):
        super().__init__(0.2)
        self.clock, self.after_rows, self.folder, self.seconds, self.rate = clock, after_rows, folder, seconds, rate
        self.reports: dict = {}

    def _run(self):  # one recording, once the rows have come, instead of Poller's loop
        from common import _cmdline, tree_cpu_seconds

        while not self._stop.is_set() and (not self.clock.timeline or self.clock.timeline[-1][1] < self.after_rows):
            self._stop.wait(self.every)
        if self._stop.is_set():
            return
        targets = {}
        for pid in tree_cpu_seconds():
            line = _cmdline(pid)
            if "Predictor" in line and "model actor" not in targets:
                targets["model actor"] = (pid, line.split()[0])
            elif "featurize_batch" in line and "decoding task" not in targets:
                targets["decoding task"] = (pid, line.split()[0])
        spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        procs = {}
        for name, (pid, title) in targets.items():
            out = os.path.join(self.folder, f"spy-{pid}.txt")
            procs[name] = (pid, title, out, subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--duration", str(int(self.seconds)), "--rate", str(self.rate),
                 "--format", "raw", "--nonblocking", "--output", out],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for name, (pid, title, out, proc) in procs.items():
            _, err = proc.communicate()
            self.reports[name] = summarise_stacks(out, self.seconds * self.rate) | {
                "pid": pid, "title": title, "py_spy_status": proc.returncode,
                "py_spy_error": err.decode(errors="replace")[-300:] if proc.returncode else ""}


def summarise_stacks(path: str, possible: float, top: int = 12) -> dict:
    """From py-spy's raw output (`frame;frame;... count` per line): busy share and the functions with most samples,
    by own samples (leaf) and by samples under them (inclusive)."""
    own, under, total = {}, {}, 0
    try:
        lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    except OSError:
        return {"samples": 0}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        names = [f.split(" (")[0] + " (" + os.path.basename(f.split(" (")[1]).split(":")[0] + ")" if " (" in f else f
                 for f in frames]
        if names:
            own[names[-1]] = own.get(names[-1], 0) + n
        for name in set(names):
            under[name] = under.get(name, 0) + n
    ranked = lambda d, most: [{"function": k, "share": v / max(1, total)}
                              for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v <= most * total][:top]
    # frames under (nearly) every sample (the worker's loop) say nothing of where the time goes
    return {"samples": total, "busy_share": total / possible if possible else None, "own": ranked(own, 1.0),
            "inclusive": ranked(under, 0.98)}


def run_job(model_dir: str, input_spec: str, output: str, audio_seconds: float, name: str, num_cpus=None,
            fresh: bool = True, spy_folder: str | None = None, expected: int = 0) -> dict:
    """run_label with the job's defaults on `input_spec` (in a new embedded Ray when `fresh`): wall, rows, start-up,
    steady rate, tail, CPU per process role, and py-spy reports when `spy_folder` is given."""
    from contextlib import nullcontext

    from langid.labeling import run_label

    ray_s, cpus = fresh_ray(num_cpus) if fresh else (None, None)
    load_before = load_averages()
    with CpuByRole() as cpu, RowClock(output + ".partial") as clock, \
            (Spy(clock, max(1, expected // 3), spy_folder) if spy_folder else nullcontext()) as spy:
        t0 = time.perf_counter()
        res = run_label(model_dir, input_spec, output, progress=False)
        end = time.perf_counter()
    wall = end - t0
    with open(output, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    windows = sum(int(r["windows"] or 0) for r in rows)
    phases = clock.phases(t0, end, len(rows))
    return {"name": name, "files": len(rows), "errors": sum(r["status"] != "ok" for r in rows),
            "audio_s": audio_seconds, "ray_start_s": ray_s, "ray_cpus": cpus, "wall": wall,
            "files_per_s": len(rows) / wall, "rtf": audio_seconds / wall, "windows": windows,
            "windows_per_file": windows / max(1, len(rows)), "windows_per_s": windows / wall, **phases,
            "cpu_by_role": cpu.table(), "load_before": load_before, "load_after": load_averages(),
            "spy": spy.reports if spy_folder else None, "summary": res.summary()}


# ---------------------------------------------------------------- modes

def throughput(a: argparse.Namespace, tmp: str, facts: dict) -> tuple[str, dict]:
    from langid.inference import OnnxIdentifier

    cfg = FeatureConfig()
    defaults = job_defaults()
    batch = OnnxIdentifier.default_batch_size  # what the actor's logprobs uses; the job hands it 16 files a batch
    sizes = sorted(a.files)
    paths = cached_clips(sizes[-1], a.seed)
    model = random_model(os.path.join(tmp, "model"), cfg)
    sample = paths[:: max(1, sizes[-1] // a.limit_clips)][: a.limit_clips]
    specs = clip_windows(sample, cfg)
    windows_per_clip = len(specs) / len(sample)
    long_secs = make_clips(os.path.join(tmp, "long"), a.long_files, a.long_seconds, a.seed + 1) if a.long_files else 0
    facts.update(wait_for_quiet(a.max_load, up_to=a.max_wait, log=lambda m: print(m, file=sys.stderr, flush=True)))

    print("the limit: the network's forward pass alone ...", file=sys.stderr, flush=True)
    limit = bench_limit(model, specs, batch, a.passes, a.torch_windows)
    jobs, failed = [], []
    for n in sizes:
        print(f"run_label on {n:,} clips (fresh embedded Ray) ...", file=sys.stderr, flush=True)
        spec = write_list(paths[:n], os.path.join(tmp, f"list-{n}.txt"))
        attempt(jobs, failed, lambda: run_job(model, spec, os.path.join(tmp, f"out-{n}.csv"), n * a.clip_seconds,
                                              f"{n:,} clips of 10 s", a.num_cpus, expected=n,
                                              spy_folder=tmp if a.profile and n == sizes[-1] else None))
        write_results("label.partial", "(a run in progress: its jobs so far)", {"facts": facts, "limit": limit,
                                                                                "jobs": jobs, "failed": failed})
    if a.long_files:
        print(f"run_label on {a.long_files} files of {a.long_seconds:g} s ...", file=sys.stderr, flush=True)
        attempt(jobs, failed, lambda: run_job(model, os.path.join(tmp, "long"), os.path.join(tmp, "long.csv"),
                                              long_secs, f"{a.long_files} files of {a.long_seconds:g} s",
                                              a.num_cpus, expected=a.long_files))
    import ray

    ray.shutdown()
    after = time_forward(model, specs, "onnx", 1, batch, 1)
    print(f"  limit again, onnx 1 thread: {after['windows_per_s']:.1f} windows/s", file=sys.stderr, flush=True)

    if failed:
        facts["failed_jobs"] = "; ".join(failed)
    facts["load_at_end"] = load_averages()
    data = {"facts": facts, "job_defaults": defaults, "limit": limit, "limit_after": after,
            "windows_per_clip": windows_per_clip, "jobs": jobs,
            "settings": {"sample_clips": len(sample), "passes": a.passes, "torch_windows": a.torch_windows,
                         "batch": batch}}
    for name in ("label.partial.json", "label.partial.md"):
        try:
            os.remove(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name))
        except OSError:
            pass
    return render_throughput(data), data


def render_throughput(data: dict) -> str:
    """The Markdown report of a throughput run's data (also adds the derived figures to `data`); --render redoes it
    from a results JSON."""
    facts, defaults, limit, after = data["facts"], data["job_defaults"], data["limit"], data["limit_after"]
    jobs, windows_per_clip = data["jobs"], data["windows_per_clip"]
    settings = data.get("settings") or {"sample_clips": limit[0]["windows"], "passes": limit[0]["passes"],
                                        "torch_windows": limit[-1]["windows"], "batch": limit[0]["batch"]}
    batch = settings["batch"]
    # the limit: the network on the one CPU the job's actor reserves (1 thread); the actor's second thread only
    # runs on CPU decoding leaves idle, so the 2-thread pass (both cores, no decoding) is shown beside it
    main_limit = next(r for r in limit if r["backend"] == defaults["backend"] and r["threads"] == int(defaults["cpus_per_actor"]))
    both = next((r for r in limit if r["backend"] == defaults["backend"] and r["threads"] == 2), None)
    L = max(main_limit["windows_per_s"], after["windows_per_s"])  # the faster of the two: a conservative limit
    data["limit_windows_per_s"] = L
    lim_rows = []
    for r in limit + [dict(after, when="after the jobs")]:
        lim_rows.append({"what": f"{r['backend']}, {r['threads']} thread(s), batch {r['batch']}"
                                 + (" (after the jobs)" if r.get("when") else ""),
                         "windows": r["windows"], "wall": r["wall"], "ms_per_window": r["ms_per_window"],
                         "cpu_ms_per_window": 1000 * r["cpu"] / r["windows"],
                         "windows_per_s": r["windows_per_s"], "files_per_s": r["windows_per_s"] / windows_per_clip,
                         "vs_job_limit": r["windows_per_s"] / L, "load": r["load"]})
    for j in jobs:  # ratios in windows/s: a file of 60 s is six of the limit's windows
        j["vs_limit"] = j["windows_per_s"] / L
        j["vs_two_threads"] = j["windows_per_s"] / both["windows_per_s"] if both else None
        j["steady_windows_per_s"] = None if j["steady_rows_per_s"] is None else j["steady_rows_per_s"] * j["windows_per_file"]
        j["steady_vs_limit"] = None if j["steady_windows_per_s"] is None else j["steady_windows_per_s"] / L
        j["limit_files_per_s"] = L / j["windows_per_file"]
        j["steady_files_per_s"] = j["steady_rows_per_s"]
        actor = sum(r["cpu_s"] for r in j["cpu_by_role"] if "Predictor" in r["role"])
        decode = sum(r["cpu_s"] for r in j["cpu_by_role"] if "featurize" in r["role"])
        j["actor_cpu_s"], j["decode_cpu_s"] = actor, decode
        j["actor_busy"] = actor / j["wall"]
        j["decode_cpu_ms_per_file"] = 1000 * decode / max(1, j["files"])
        j["actor_cpu_ms_per_window"] = 1000 * actor / max(1, j["windows"])
        j["tree_cpu_ms_per_file"] = 1000 * sum(r["cpu_s"] for r in j["cpu_by_role"]) / max(1, j["files"])
        j["tree_cores_busy"] = sum(r["cpu_s"] for r in j["cpu_by_role"]) / j["wall"]
    clips = [j for j in jobs if "clips" in j["name"]]
    growth = data["growth"] = growth_lines(clips, L / windows_per_clip)

    job_cols = [("name", "input"), ("files", "files"), ("windows", "windows"), ("ray_start_s", "Ray start s"),
                ("wall", "wall s"), ("files_per_s", "files/s"), ("limit_files_per_s", "limit files/s"),
                ("vs_limit", "× limit"), ("vs_two_threads", "× 2-thread pass"), ("first_rows_s", "first rows at s"), ("steady_files_per_s", "steady files/s"),
                ("steady_vs_limit", "steady × limit"), ("tail_s", "tail s"), ("actor_busy", "actor CPU / wall"),
                ("actor_cpu_ms_per_window", "actor CPU ms/window"), ("decode_cpu_ms_per_file", "decode CPU ms/file"),
                ("tree_cores_busy", "cores used by the job"), ("errors", "errors"), ("load_before", "load before"),
                ("load_after", "load after")]
    lim_cols = [("what", "forward pass (logprobs)"), ("windows", "windows"), ("wall", "wall s"),
                ("ms_per_window", "ms/window"), ("cpu_ms_per_window", "CPU ms/window"), ("windows_per_s", "windows/s"),
                ("files_per_s", "10-s clips/s"), ("vs_job_limit", "× the job's limit"), ("load", "load (1, 5, 15 min)")]
    biggest = clips[-1] if clips else jobs[0]
    role_rows = [dict(r, per_file_ms=1000 * r["cpu_s"] / max(1, biggest["files"])) for r in biggest["cpu_by_role"]
                 if r["cpu_s"] >= 0.5]
    role_cols = [("role", "process (role)"), ("processes", "processes"), ("cpu_s", "CPU s"), ("share", "share"),
                 ("per_file_ms", "CPU ms per file")]
    alone_cpu = 1000 * main_limit["cpu"] / main_limit["windows"]
    goal_lines, where = [], []
    for j in clips:
        verdict = "PASS" if j["vs_limit"] >= GOAL_VS_LIMIT else "MISS"
        goal_lines.append(f"- {verdict}: {j['name']}: {j['files_per_s']:.2f} files/s end to end = {j['vs_limit']:.2f}× "
                          f"the limit ({L / windows_per_clip:.2f} clips/s: ONNX Runtime, 1 thread, batch {batch}); goal "
                          f"≥ {GOAL_VS_LIMIT}× at 10,000 files. Start-up to the first rows {j['first_rows_s']:.1f} s "
                          f"(+ {j['ray_start_s']:.1f} s starting Ray), then "
                          + (f"{j['steady_files_per_s']:.2f} files/s steady = {j['steady_vs_limit']:.2f}× the limit"
                             if j["steady_files_per_s"] else "no steady rate (too few rows)")
                          + f"; the model actor's CPU was {j['actor_busy']:.0%} of the wall.")
        if j["errors"]:
            goal_lines.append(f"  - {j['errors']} error rows (should be 0): {j['summary']}")
        where.append(f"- {j['name']}: the actor spent {j['actor_cpu_ms_per_window']:.1f} ms of CPU per window "
                     f"(alone, the forward pass takes {alone_cpu:.1f} ms of CPU per window: "
                     f"{j['actor_cpu_ms_per_window'] / alone_cpu - 1:+.0%}), busy {j['actor_busy']:.0%} of the wall; "
                     f"decoding {j['decode_cpu_ms_per_file']:.1f} ms of CPU per file; the whole process tree "
                     f"{j['tree_cpu_ms_per_file']:.1f} ms per file, {j['tree_cores_busy']:.2f} of the 2 cores on average.")
    if data.get("facts", {}).get("failed_jobs"):
        goal_lines.append(f"- failed jobs: {data['facts']['failed_jobs']}")
    spy_md = spy_markdown(biggest.get("spy"))
    return "\n".join([
        "# Labeling throughput", "", facts_line(facts), "",
        "## The job against the limit", "", markdown_table(jobs, job_cols), "",
        "Each run starts a fresh embedded Ray (its start is 'Ray start s', outside 'wall s', which is run_label's "
        "call). 'first rows at s': when the first rows reached the partial CSV (start-up: Ray Data planning, the "
        "actor loading the model, the first decoded batches); 'steady': the rate from those rows to the last ones; "
        "'tail': from the last rows to run_label's return (publishing the CSV, the summary). Ratios are in windows/s "
        "against the limit (a 60-s file is six windows). 'cores used by the job': CPU seconds of this process and all "
        "it started, per wall second. Job defaults: " + ", ".join(f"{k} {v}" for k, v in defaults.items()) + ".",
        "", "## The limit: the network's batched forward pass alone", "", markdown_table(lim_rows, lim_cols), "",
        f"On the windows of {settings['sample_clips']} of the same clips ({windows_per_clip:g} window per clip), "
        "decoded and featurized beforehand as the job's decoding tasks do, in this process with nothing else of ours "
        f"running; fastest of {settings['passes']} passes for ONNX Runtime (torch: one pass on "
        f"{settings['torch_windows']} windows, for reference). The job's limit is ONNX Runtime with 1 thread (the "
        f"job's backend, on the one CPU its actor reserves) at batch {batch}; the faster of its two measurements "
        "(before and after the jobs) is used. The actor runs "
        f"{defaults.get('threads_per_actor', 1)} threads: the second uses the CPU the decoding tasks leave idle. "
        "'× 2-thread pass' compares the job with the network alone on both cores, which no job that also decodes "
        "its audio on the same two cores can reach.",
        "", "## How the figure grows with the input", "", *growth["lines"],
        "", "## Where the time goes", "", *where,
        "", f"CPU per process role ({biggest['name']}):", "", markdown_table(role_rows, role_cols), "",
        "CPU seconds of this process and every process it started, sampled every 0.5 s from /proc, by the role "
        "the process had (Ray workers name the task they run); roles under 0.5 s left out.", *spy_md,
        "", "## Goals", "", *goal_lines])


def attempt(jobs: list, failed: list, run) -> None:
    """Run one job into `jobs`; a job that fails (on a shared checkout, someone's half-edited module) is recorded in
    `failed` with its error instead of losing the runs already made."""
    try:
        jobs.append(run())
        print(f"  {jobs[-1]['wall']:.1f} s, {jobs[-1]['files_per_s']:.2f} files/s", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001
        failed.append(f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}")
        print(f"  FAILED: {failed[-1]}", file=sys.stderr, flush=True)


def growth_lines(jobs: list[dict], limit_fps: float) -> dict:
    """How the end-to-end ratio depends on the number of files N: per run, wall(N) ≈ start-up (to the first rows)
    + tail + N / steady rate, so the ratio tends to the steady ratio; and the fit through the two largest runs."""
    sizes = (1_000, 2_000, 10_000, 100_000, 1_000_000)
    lines, per_run = [], {}
    for j in jobs:
        if not j.get("steady_rows_per_s"):
            continue
        fixed = j["first_rows_s"] + j["tail_s"]
        ratio = {n: n / (fixed + n / j["steady_rows_per_s"]) / limit_fps for n in sizes}
        per_run[j["name"]] = {"fixed_s": fixed, "steady_files_per_s": j["steady_rows_per_s"], "projected": ratio}
        lines.append(f"- from the run of {j['name']}: start-up + tail {fixed:.1f} s (+ {j['ray_start_s']:.1f} s starting "
                     f"Ray) and {j['steady_rows_per_s']:.2f} files/s steady ({j['steady_rows_per_s'] / limit_fps:.2f}× "
                     "the limit) give, for N files: " + ", ".join(f"{n:,} {r:.2f}×" for n, r in ratio.items()) + ".")
    if len(jobs) >= 2:
        (n1, w1), (n2, w2) = [(j["files"], j["wall"]) for j in jobs[-2:]]
        rate = (n2 - n1) / (w2 - w1)
        fixed = w1 - n1 / rate
        lines.append(f"- through the walls of both runs: wall ≈ {fixed:.1f} s + N / {rate:.2f} files/s"
                     + (" (a negative fixed cost: the two runs' steady rates differ, as the load on the machine did; "
                        "the per-run figures above are the ones to read)" if fixed < 0 else "") + ".")
    lines.append("Start-up is a fixed cost of seconds, so the end-to-end ratio approaches the steady ratio as N grows; "
                 "beyond a few thousand files the steady rate decides the figure.")
    return {"per_run": per_run, "lines": lines}


def spy_markdown(spy) -> list[str]:
    if not spy:
        return []
    out = ["", "### py-spy during the steady state", ""]
    for name, r in spy.items():
        if not r.get("samples"):
            out.append(f"- {name} (pid {r.get('pid')}, {r.get('title')}): no samples {r.get('py_spy_error', '')}")
            continue
        listed = sum(x["share"] for x in r["own"][:6])
        out.append(f"- {name} (pid {r['pid']}, `{r['title']}`): busy {r['busy_share']:.0%} of the samples possible; "
                   "most own samples: " + "; ".join(f"{x['function']} {x['share']:.0%}" for x in r["own"][:6])
                   + (f" (these add to {listed:.0%}: the rest is in a frame holding over 98% of the samples, left "
                      "out of this JSON by the version that recorded it)" if listed < 0.5 else "")
                   + ". Under: " + "; ".join(f"{x['function']} {x['share']:.0%}" for x in r["inclusive"][:10]))
    return out


def memory(a: argparse.Namespace, tmp: str, facts: dict) -> tuple[str, dict]:
    # 1-s windows and 32 mels: 10,000 files in minutes; memory is about the number of files, not the model
    cfg = FeatureConfig(window_seconds=1.0, n_mels=32)
    model = random_model(os.path.join(tmp, "model"), cfg)
    counts = sorted(a.memory_files)
    sources = -(-max(counts) // 50_000)  # ext4 allows 65,000 links to one file
    make_clips(os.path.join(tmp, "one"), sources, 1.0, a.seed)
    links = os.path.join(tmp, "links")
    os.makedirs(links)
    for i in range(max(counts)):
        os.link(os.path.join(tmp, "one", f"clip{i % sources:05d}.flac"), os.path.join(links, f"c{i:06d}.flac"))
    fresh_ray(a.num_cpus)  # one Ray for both runs: the baseline before each includes it
    facts.update(wait_for_quiet(a.max_load, up_to=a.max_wait, log=lambda m: print(m, file=sys.stderr, flush=True)))
    runs = []
    for n in counts:
        listing = os.path.join(tmp, f"list-{n}.txt")
        with open(listing, "w") as f:
            f.writelines(os.path.join(links, f"c{i:06d}.flac") + "\n" for i in range(n))
        baseline = tree_rss()
        with PeakSampler() as sampler:
            job = run_job(model, f"@{listing}", os.path.join(tmp, f"out-{n}.csv"), float(n), f"{n} files",
                          fresh=False)
        after = tree_rss()
        runs.append({"files": n, "baseline_mib": baseline / MB, "peak_mib": sampler.peak / MB,
                     "after_mib": after / MB, "growth_mib": (sampler.peak - baseline) / MB, "wall": job["wall"],
                     "files_per_s": job["files_per_s"], "errors": job["errors"], "samples": sampler.samples})
    columns = [("files", "files"), ("baseline_mib", "RSS before MiB"), ("peak_mib", "peak RSS MiB"),
               ("growth_mib", "peak − before MiB"), ("after_mib", "RSS after MiB"), ("wall", "wall s"),
               ("files_per_s", "files/s"), ("samples", "samples")]
    small, large = runs[0], runs[-1]
    delta = large["peak_mib"] - small["peak_mib"]
    per_file = delta * 1024 / max(1, large["files"] - small["files"])
    noise = max(64.0, 0.05 * small["peak_mib"])
    verdict = "PASS" if delta <= noise else "MISS"
    facts["load_at_end"] = load_averages()
    md = "\n".join([
        "# Labeling memory", "", facts_line(facts), "",
        markdown_table(runs, columns), "",
        "RSS summed over this process and every process it started (embedded Ray: GCS, raylet, workers), "
        "sampled every 0.25 s with psutil. Shared pages (Ray's object "
        "store, libraries) count once per process, so the sum is an upper bound; what matters is the change "
        "with the number of files. Inputs: hard links to 1-s clips (one per 50,000 files) listed in an @list file; "
        "model: resnet18, 1-s windows, 32 mels, random weights.", "", "## Goal", "",
        f"- {verdict}: peak RSS at {large['files']:,} files is {delta:+.0f} MiB from {small['files']:,} files "
        f"({per_file:+.2f} KiB per extra file); goal: no growth beyond noise (taken as {noise:.0f} MiB).",
        *([f"- {sum(r['errors'] for r in runs)} error rows (should be 0)"] if any(r["errors"] for r in runs) else [])])
    return md, {"facts": facts, "runs": runs}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ints = lambda s: [int(x) for x in s.split(",")]
    p.add_argument("--files", type=ints, default=[2000, 10000],
                   help="numbers of 10-s clips to label, one run each (default 2000,10000)")
    p.add_argument("--long-files", type=int, default=10, help="long files to label, 0 for none (default %(default)s)")
    p.add_argument("--long-seconds", type=float, default=60.0, help="their length (default %(default)s)")
    p.add_argument("--limit-clips", type=int, default=256, help="clips whose windows time the limit (default %(default)s)")
    p.add_argument("--passes", type=int, default=2, help="timed passes of the limit, fastest kept (default %(default)s)")
    p.add_argument("--torch-windows", type=int, default=128, help="windows for the torch reference (default %(default)s)")
    p.add_argument("--profile", action="store_true", help="py-spy on the actor and a decoding task in the largest run")
    p.add_argument("--memory", action="store_true", help="peak memory at 1,000 and 10,000 files instead")
    p.add_argument("--memory-files", type=ints, default=[1000, 10000], help="file counts for --memory (default 1000,10000)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few files, not a measurement")
    p.add_argument("--num-cpus", type=int, help="CPUs for the embedded Ray (default: all)")
    p.add_argument("--max-load", type=float, default=2.5,
                   help="wait until the 1-minute load average is at most this before measuring (default %(default)s)")
    p.add_argument("--max-wait", type=float, default=600.0, help="but wait at most this many seconds (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", help="keep the generated inputs and outputs in this folder")
    p.add_argument("--render", metavar="JSON", help="only write the report again from a throughput run's results JSON")
    a = p.parse_args(argv)
    a.clip_seconds = 10.0  # the cache's clips
    if a.quick:
        a.files, a.long_files, a.long_seconds, a.limit_clips, a.passes, a.torch_windows = [50], 2, 30.0, 32, 1, 16
        a.max_wait = 0.0
        if a.memory_files == [1000, 10000]:
            a.memory_files = [200, 1000]
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.render:
        import json

        with open(a.render) as f:
            data = json.load(f)
        md = render_throughput(data)
        print(md)
        name = os.path.splitext(os.path.basename(a.render))[0]
        print(f"\nwritten: {', '.join(map(str, write_results(name, md, data)))}", file=sys.stderr)
        return 0
    import ray
    import torch

    tmp = a.keep or tempfile.mkdtemp(prefix="langid-bench-label-")
    os.makedirs(tmp, exist_ok=True)
    facts = machine_facts(torch=torch.__version__, quick=a.quick, load_averages_at_start=load_averages())
    try:
        if a.memory:
            facts.update(files=",".join(str(n) for n in a.memory_files))
            md, data = memory(a, tmp, facts)
            name = "label-memory"
        else:
            import onnxruntime

            facts.update(onnxruntime=onnxruntime.__version__, files=",".join(str(n) for n in a.files),
                         clip_seconds=a.clip_seconds, long_files=a.long_files, long_seconds=a.long_seconds)
            md, data = throughput(a, tmp, facts)
            name = "label"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if a.quick:
        name += "-quick"
    print(md)
    paths = write_results(name, md, data)
    print(f"\nwritten: {paths[0]} and {paths[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
