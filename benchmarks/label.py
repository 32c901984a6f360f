#!/usr/bin/env python
"""Labeling throughput and memory: the Ray job (run_label) against the model's own forward-pass limit.

One invocation measures, on the same machine and in the same run:
  * the limit: LanguageIdentifier.logprobs on random windows of the default FeatureConfig, in this process,
    with torch threads = 1 and = 2 (windows/s);
  * the job: run_label on N generated 10-s clips and on a few long files (files/s, windows/s and the
    real-time factor = audio seconds per wall second), and its windows/s as a share of the limit.
With --memory it instead labels 1,000 and 10,000 one-second files (hard links to one clip, given as an
@list) and samples the resident memory of this process plus every Ray process it started.

    python benchmarks/label.py                 # 200 clips of 10 s + 10 files of 60 s
    python benchmarks/label.py --quick         # a smoke run, not a measurement
    python benchmarks/label.py --memory        # peak RSS at 1,000 and 10,000 files
The model is a resnet18 LangIdNet with random weights: throughput does not depend on training.
Results: a Markdown table on stdout and in benchmarks/results/label.{md,json} (label-memory.* for --memory).
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import soundfile as sf

from common import Poller, cpu_count, facts_line, load_average, machine_facts, markdown_table, write_results

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


def random_model(folder: str, cfg: FeatureConfig) -> str:
    import torch

    from langid.model import LangIdNet, save_model

    torch.manual_seed(0)
    save_model(LangIdNet("resnet18", len(LABELS)).eval(), folder, LABELS, cfg, extra={})
    return folder


# ---------------------------------------------------------------- the limit

def bench_limit(model_dir: str, windows: int, batch_size: int) -> list[dict]:
    """Windows/s of the batched forward alone, in this process, with 1 and 2 torch threads."""
    import torch

    from langid.inference import load_model

    ident = load_model(model_dir, "cpu")
    cfg = ident.cfg
    specs = np.random.default_rng(0).random((windows, cfg.n_mels, cfg.window_frames), dtype=np.float32)
    before = torch.get_num_threads()
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ident.logprobs(specs[:batch_size], batch_size)  # warm-up: allocations, kernels
        w0, c0 = time.perf_counter(), time.process_time()
        ident.logprobs(specs, batch_size)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        rows.append({"threads": threads, "windows": windows, "wall": wall, "cpu": cpu,
                     "windows_per_s": windows / wall, "windows_per_cpu_s": windows / cpu})
    torch.set_num_threads(before)
    return rows


# ---------------------------------------------------------------- memory of the process tree

def _children_proc(pid: int) -> list[int]:
    kids = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        out.append(p)
        frontier.extend(kids.get(p, []))
    return out


def tree_rss() -> int:
    """Bytes resident in this process and all its descendants (the embedded Ray's GCS, raylet, workers)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in _children_proc(os.getpid()):
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except OSError:
            pass
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

class RowClock(Poller):
    """Watches `<output>.partial`: when rows arrive, to tell start-up from the steady rate."""

    def __init__(self, output: str):
        super().__init__(0.05)
        self.partial = output + ".partial"
        self.timeline: list[tuple[float, int]] = []  # (perf_counter, rows) at each change
        self._last = 0

    def _rows(self) -> int:
        try:
            with open(self.partial, newline="", encoding="utf-8", errors="surrogateescape") as f:
                return max(0, sum(1 for _ in csv.reader(f)) - 1)
        except (OSError, csv.Error):
            return 0

    def poll(self):
        n = self._rows()
        if n > self._last:
            self.timeline.append((time.perf_counter(), n))
            self._last = n


def run_job(model_dir: str, input_spec: str, output: str, audio_seconds: float, name: str) -> dict:
    from langid.labeling import run_label

    with RowClock(output) as clock:
        t0 = time.perf_counter()
        res = run_label(model_dir, input_spec, output, progress=False)
        end = time.perf_counter()
    wall = end - t0
    with open(output, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    windows = sum(int(r["windows"] or 0) for r in rows)
    errors = sum(r["status"] != "ok" for r in rows)
    # steady rate: from the first rows seen in the partial file to the end (start-up left out); only when
    # at least half the rows came after that, else the "rate" is two bursts close together
    steady, first = None, clock.timeline[0] if clock.timeline else None
    if first is not None and first[1] <= len(rows) / 2 and end - first[0] >= 1.0:
        steady = (len(rows) - first[1]) / (end - first[0]) * (windows / max(1, len(rows)))
    return {"name": name, "files": len(rows), "errors": errors, "audio_s": audio_seconds, "wall": wall,
            "files_per_s": len(rows) / wall, "rtf": audio_seconds / wall, "windows": windows,
            "windows_per_s": windows / wall, "steady_windows_per_s": steady,
            "first_rows_s": None if first is None else first[0] - t0,
            "timeline": [(round(t - t0, 2), n) for t, n in clock.timeline], "summary": res.summary()}


# ---------------------------------------------------------------- modes

def throughput(a: argparse.Namespace, tmp: str, facts: dict) -> tuple[str, dict]:
    cfg = FeatureConfig()
    model = random_model(os.path.join(tmp, "model"), cfg)
    limit = bench_limit(model, a.limit_windows, 16)
    best = max(limit, key=lambda r: r["windows_per_s"])
    one = next(r for r in limit if r["threads"] == 1)

    jobs = []
    secs = make_clips(os.path.join(tmp, "clips"), a.files, a.clip_seconds, a.seed)
    jobs.append(run_job(model, os.path.join(tmp, "clips"), os.path.join(tmp, "clips.csv"), secs,
                        f"run_label: {a.files} clips of {a.clip_seconds:g} s"))
    secs = make_clips(os.path.join(tmp, "long"), a.long_files, a.long_seconds, a.seed + 1)
    jobs.append(run_job(model, os.path.join(tmp, "long"), os.path.join(tmp, "long.csv"), secs,
                        f"run_label: {a.long_files} files of {a.long_seconds:g} s"))

    rows = []
    for r in limit:
        rows.append({"what": f"limit: LanguageIdentifier.logprobs, torch threads = {r['threads']}",
                     "windows": r["windows"], "wall": r["wall"], "windows_per_s": r["windows_per_s"],
                     "vs_limit": r["windows_per_s"] / best["windows_per_s"]})
    for j in jobs:
        rows.append({"what": j["name"], "files": j["files"], "audio_s": j["audio_s"], "wall": j["wall"],
                     "files_per_s": j["files_per_s"], "rtf": j["rtf"], "windows": j["windows"],
                     "windows_per_s": j["windows_per_s"], "steady": j["steady_windows_per_s"],
                     "vs_limit": j["windows_per_s"] / best["windows_per_s"],
                     "vs_limit_1": j["windows_per_s"] / one["windows_per_s"]})
    columns = [("what", "what"), ("files", "files"), ("audio_s", "audio s"), ("windows", "windows"),
               ("wall", "wall s"), ("files_per_s", "files/s"), ("rtf", "real-time factor"),
               ("windows_per_s", "windows/s"), ("steady", "windows/s after 1st row"),
               ("vs_limit", "× best limit"), ("vs_limit_1", "× 1-thread limit")]
    goal_lines = []
    for j in jobs:
        ratio = j["windows_per_s"] / best["windows_per_s"]
        verdict = "PASS" if ratio >= GOAL_VS_LIMIT else "MISS"
        goal_lines.append(f"- {verdict}: {j['name']}: {ratio:.2f}× the model's best forward throughput "
                          f"({best['windows_per_s']:.2f} windows/s with {best['threads']} thread(s)); goal ≥ "
                          f"{GOAL_VS_LIMIT}×. Against the 1-thread limit: "
                          f"{j['windows_per_s'] / one['windows_per_s']:.2f}×.")
        if j["steady_windows_per_s"]:
            goal_lines.append(f"  - after the first row (start-up left out): {j['steady_windows_per_s']:.2f} windows/s, "
                              f"{j['steady_windows_per_s'] / best['windows_per_s']:.2f}× the limit; the first rows "
                              f"came {j['first_rows_s']:.1f} s after the start")
        if j["errors"]:
            goal_lines.append(f"  - {j['errors']} error rows (should be 0): {j['summary']}")
    facts["load_at_end"] = load_average()
    md = "\n".join([
        "# Labeling throughput", "", facts_line(facts), "",
        markdown_table(rows, columns), "",
        "Windows are the model's 10-s inputs (default FeatureConfig: 64 mels, 1,001 frames); a 10-s clip is one "
        "window, a 60-s file six. Job rates are wall-clock, start-up included (Ray Data planning, the model "
        "actor loading the model); 'after 1st row' leaves out everything before the first row reached the "
        "partial CSV. The limit is the network alone, in this process, on random windows, batch 16. "
        "The job runs its defaults: one model actor with one CPU (one torch thread), decoding in tasks on the "
        "other CPU. All numbers are wall-clock on a machine shared with others: see the load averages.",
        "", "## Goals", "", *goal_lines])
    return md, {"facts": facts, "limit": limit, "jobs": jobs}


def memory(a: argparse.Namespace, tmp: str, facts: dict) -> tuple[str, dict]:
    # 1-s windows and 32 mels: 10,000 files in minutes; memory is about the number of files, not the model
    cfg = FeatureConfig(window_seconds=1.0, n_mels=32)
    model = random_model(os.path.join(tmp, "model"), cfg)
    make_clips(os.path.join(tmp, "one"), 1, 1.0, a.seed)
    source = os.path.join(tmp, "one", "clip00000.flac")
    links = os.path.join(tmp, "links")
    os.makedirs(links)
    counts = sorted(a.memory_files)
    for i in range(max(counts)):
        os.link(source, os.path.join(links, f"c{i:06d}.flac"))
    runs = []
    for n in counts:
        listing = os.path.join(tmp, f"list-{n}.txt")
        with open(listing, "w") as f:
            f.writelines(os.path.join(links, f"c{i:06d}.flac") + "\n" for i in range(n))
        baseline = tree_rss()
        with PeakSampler() as sampler:
            job = run_job(model, f"@{listing}", os.path.join(tmp, f"out-{n}.csv"), float(n), f"{n} files")
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
    facts["load_at_end"] = load_average()
    md = "\n".join([
        "# Labeling memory", "", facts_line(facts), "",
        markdown_table(runs, columns), "",
        "RSS summed over this process and every process it started (embedded Ray: GCS, raylet, workers), "
        f"sampled every 0.25 s{' with psutil' if _has_psutil() else ' from /proc'}. Shared pages (Ray's object "
        "store, libraries) count once per process, so the sum is an upper bound; what matters is the change "
        "with the number of files. Inputs: hard links to one 1-s clip listed in an @list file; model: resnet18, "
        "1-s windows, 32 mels, random weights.", "", "## Goal", "",
        f"- {verdict}: peak RSS at {large['files']:,} files is {delta:+.0f} MiB from {small['files']:,} files "
        f"({per_file:+.2f} KiB per extra file); goal: no growth beyond noise (taken as {noise:.0f} MiB).",
        *([f"- {sum(r['errors'] for r in runs)} error rows (should be 0)"] if any(r["errors"] for r in runs) else [])])
    return md, {"facts": facts, "runs": runs}


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--files", type=int, default=200, help="10-s clips to label (default %(default)s)")
    p.add_argument("--clip-seconds", type=float, default=10.0, help="length of those clips (default %(default)s)")
    p.add_argument("--long-files", type=int, default=10, help="long files to label (default %(default)s)")
    p.add_argument("--long-seconds", type=float, default=60.0, help="their length (default %(default)s)")
    p.add_argument("--limit-windows", type=int, default=96, help="windows timed for the limit (default %(default)s)")
    p.add_argument("--memory", action="store_true", help="peak memory at 1,000 and 10,000 files instead")
    p.add_argument("--memory-files", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10000],
                   help="file counts for --memory (default 1000,10000)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few files, not a measurement")
    p.add_argument("--num-cpus", type=int, help="CPUs for the embedded Ray (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", help="keep the generated inputs and outputs in this folder")
    a = p.parse_args(argv)
    if a.quick:
        a.files, a.long_files, a.long_seconds, a.limit_windows = 20, 2, 30.0, 32
        if a.memory_files == [1000, 10000]:
            a.memory_files = [200, 1000]
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    from langid.runtime import init_ray, quiet_ray_data

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=a.num_cpus)
    quiet_ray_data()
    import ray
    import torch

    tmp = a.keep or tempfile.mkdtemp(prefix="langid-bench-label-")
    os.makedirs(tmp, exist_ok=True)
    facts = machine_facts(torch=torch.__version__, ray_cpus=int(ray.cluster_resources().get("CPU", 0)),
                          quick=a.quick)
    try:
        if a.memory:
            facts.update(files=",".join(str(n) for n in a.memory_files))
            md, data = memory(a, tmp, facts)
            name = "label-memory"
        else:
            facts.update(files=a.files, clip_seconds=a.clip_seconds, long_files=a.long_files,
                         long_seconds=a.long_seconds, cpus=cpu_count())
            md, data = throughput(a, tmp, facts)
            name = "label"
    finally:
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
