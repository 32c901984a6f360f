#!/usr/bin/env python
"""Scaling: preprocessing and labeling with 1 and 2 Ray workers and on a two-node cluster, against one process.

One invocation, one generated corpus (the preprocessing benchmark's 10-s 22,050 Hz FLAC clips), one model
(resnet18 with random weights, as in the labeling benchmark: inference costs the same trained or not):
  * baseline: the same work in a plain loop in this process, no Ray, one core: process_batch (process_file
    + the same Parquet shards) for preprocessing, LanguageIdentifier.predict_many (one torch thread) for labeling;
  * Ray embedded with 1 and with 2 CPUs: the real jobs (jobs/preprocess.py, jobs/label.py --num-cpus N),
    each run a fresh process that starts its own Ray, as a user runs them;
  * the two-node local cluster (tests/support/localcluster.py: a head and a worker node of 1 CPU each, separate
    `ray start` processes on loopback): the same jobs through `ray job submit`.
Every rate is files per wall second, as a ratio to the baseline measured in the same run.

    python benchmarks/scaling.py               # 200 clips, about 5-8 minutes on 2 cores
    python benchmarks/scaling.py --files 16    # a smoke run, not a measurement
Results: a Markdown table on stdout and in benchmarks/results/scaling.{md,json}.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from common import cpu_count, facts_line, load_average, machine_facts, markdown_table, write_results  # noqa: E402
from label import Poller, RowClock, bench_limit, random_model  # noqa: E402
from preprocess import bench_compute_limit, bench_in_process, make_corpus, usable_paths  # noqa: E402

from langid.cli import int_at_least  # noqa: E402
from langid.config import FeatureConfig  # noqa: E402
from langid.runtime import REPO_ROOT  # noqa: E402

CLUSTER_NODES = [{"CPU": 1}, {"CPU": 1}]
JOB_SECONDS = re.compile(r"\bin ([0-9]+(?:\.[0-9]+)?) s\b")  # the jobs' summaries: "... in 12.3 s"
LABEL_BATCH = 16  # files per inference batch, the label job's default
PREPROCESS_BATCH = 32  # files per task, the preprocess job's default
LIMIT_WINDOWS = 48


# ---------------------------------------------------------------- baselines: one process, no Ray

def bench_predict_loop(model_dir: str, paths: list[str]) -> dict:
    """predict_many over the files in batches of the job's size, one torch thread; the first file untimed."""
    import torch
    from threadpoolctl import threadpool_limits

    from langid.inference import load_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, like the job's model actor and the preprocessing baseline
    try:
        with threadpool_limits(1):
            ident = load_model(model_dir, "cpu")
            ident.predict_many(paths[:1])
            w0, c0 = time.perf_counter(), time.process_time()
            preds = [p for i in range(0, len(paths), LABEL_BATCH)
                     for p in ident.predict_many(paths[i:i + LABEL_BATCH], batch_size=LABEL_BATCH)]
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        torch.set_num_threads(before)
    return {"files": len(paths), "seconds": wall, "cpu_seconds": cpu, "errors": sum(p.status != "ok" for p in preds)}


# ---------------------------------------------------------------- the jobs

class ShardClock(Poller):
    """Watches a store's windows shards: when files arrive, to tell start-up from the steady rate."""

    def __init__(self, store: str):
        super().__init__(0.05)
        self.folder = os.path.join(store, "windows")
        self.timeline: list[tuple[float, int]] = []  # (perf_counter, files) at each change
        self._files: dict[str, int] = {}

    def poll(self):
        import pyarrow.parquet as pq

        try:
            names = [n for n in os.listdir(self.folder) if n.endswith(".parquet") and not n.startswith(".")]
        except OSError:
            return
        new = [n for n in names if n not in self._files]
        for n in new:  # shards are renamed into place whole, so a visible one is complete
            self._files[n] = len(set(pq.read_table(os.path.join(self.folder, n), columns=["path"])
                                     .column("path").to_pylist()))
        if new:
            self.timeline.append((time.perf_counter(), sum(self._files.values())))


def run_process(argv: list[str], timeout: float) -> str:
    """Run a job in a fresh process (its own embedded Ray) in its own process group; its output."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the job and the Ray it started, nothing else
        p.communicate()
        raise RuntimeError(f"{argv[0]} still running after {timeout:.0f} s") from None
    if p.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed (exit {p.returncode}):\n{out[-5000:]}")
    return out


def steady_rate(timeline: list[tuple[float, int]], files: int) -> float | None:
    """Files/s from the first output seen to the last (start-up and teardown left out); only when at least
    half the files came after the first output and over at least a second, else it measures two bursts."""
    if not timeline:
        return None
    (t1, n1), (t2, n2) = timeline[0], timeline[-1]
    if n1 > files / 2 or t2 - t1 < 1.0 or n2 <= n1:
        return None
    return (n2 - n1) / (t2 - t1)


def timed_job(run, clock: Poller, files: int) -> dict:
    """Wall clock of `run()` (which returns the job's output), the job's own clock, the steady rate."""
    load = load_average()
    with clock:
        t0 = time.perf_counter()
        log = run()
        wall = time.perf_counter() - t0
    found = JOB_SECONDS.findall(log)
    return {"wall": wall, "job_seconds": float(found[-1]) if found else None,
            "steady": steady_rate(clock.timeline, files), "load_1min": load,
            "first_output_s": clock.timeline[0][0] - t0 if clock.timeline else None,
            "timeline": [(round(t - t0, 2), n) for t, n in clock.timeline], "log_tail": log.strip()[-600:]}


def preprocess_argv(corpus: str, store: str) -> list[str]:
    return ["jobs/preprocess.py", "--input", corpus, "--output", store, "--quiet"]


def label_argv(model: str, clips: str, output: str) -> list[str]:
    return ["jobs/label.py", "--model", model, "--input", clips, "--output", output, "--quiet"]


def check_store(store: str, files: int) -> int:
    """Files that did not reach the store (should be 0)."""
    from langid.store import Store

    return files - Store(store).counts()["files_ok"]


def check_labels(output: str, files: int) -> int:
    """Files without an ok row in the CSV (should be 0)."""
    with open(output, newline="", encoding="utf-8") as f:
        return files - sum(r["status"] == "ok" for r in csv.DictReader(f))


def run_both(tag: str, runner, tmp: str, corpus: str, clips: str, model: str, files: int) -> dict:
    """The preprocess then the label job through `runner(argv)`; both timed and their outputs checked."""
    store, labels = os.path.join(tmp, f"store-{tag}"), os.path.join(tmp, f"labels-{tag}.csv")
    pre = timed_job(lambda: runner(preprocess_argv(corpus, store)), ShardClock(store), files)
    pre["missing"] = check_store(store, files)
    lab = timed_job(lambda: runner(label_argv(model, clips, labels)), RowClock(labels), files)
    lab["missing"] = check_labels(labels, files)
    return {"preprocess": pre, "label": lab}


def run_embedded(cpus: int, timeout: float, **kw) -> dict:
    print(f"Ray embedded, {cpus} CPU(s) ...", file=sys.stderr)
    return run_both(f"embedded-{cpus}", lambda argv: run_process([*argv, "--num-cpus", str(cpus)], timeout), **kw)


def run_cluster(timeout: float, **kw) -> dict:
    from support.localcluster import LocalCluster

    print("two-node local cluster ...", file=sys.stderr)
    submissions = []  # (time submitted, time the CLI returned, its output) per job

    def submit(argv: list[str]) -> str:
        t0 = time.time()
        log = cluster.submit(argv, timeout=timeout)
        submissions.append((t0, time.time(), log))
        return log

    t0 = time.perf_counter()
    with LocalCluster(CLUSTER_NODES) as cluster:
        start = time.perf_counter() - t0
        out = run_both("cluster", submit, **kw)
        jobs = submitted_jobs(cluster)
        t1 = time.perf_counter()
    out.update(start_s=start, stop_s=time.perf_counter() - t1)
    for job, (sent, returned, log) in zip(("preprocess", "label"), submissions):
        sid = SUBMISSION_ID.search(log)
        out[job]["submission"] = submission_phases(sent, returned, jobs.get(sid and sid.group()),
                                                   out[job]["job_seconds"])
    return out


SUBMISSION_ID = re.compile(r"raysubmit_\w+")


def submitted_jobs(cluster) -> dict:
    """submission id -> Ray's record of the job (start and end times in ms), or {} if Ray does not say."""
    import json

    from support.localcluster import ClusterError

    try:
        jobs = json.loads(cluster.ray_cli("list", "jobs", f"--address={cluster.dashboard}", "--format=json",
                                          "--detail"))
    except (ClusterError, ValueError, subprocess.TimeoutExpired):
        return {}
    return {j.get("submission_id"): j for j in jobs}


def submission_phases(sent: float, returned: float, job: dict | None, job_seconds: float | None) -> dict | None:
    """Where a `ray job submit` spends its wall clock, from Ray's own start and end times of the job."""
    if not job or not job.get("start_time") or not job.get("end_time") or job_seconds is None:
        return None
    started, ended = job["start_time"] / 1000, job["end_time"] / 1000
    return {"cli_and_upload_s": started - sent,  # CLI start-up, working-dir package and upload, submission
            # job supervisor and runtime env, driver start-up, imports, joining the cluster, exit
            "driver_outside_job_clock_s": ended - started - job_seconds,
            "job_clock_s": job_seconds, "cli_poll_s": returned - ended}


# ---------------------------------------------------------------- report

CONFIGS = [("embedded-1", "Ray embedded, 1 CPU (1 worker)"), ("embedded-2", "Ray embedded, 2 CPUs (2 workers)"),
           ("cluster", "two-node local cluster, 1 + 1 CPU, `ray job submit`")]


def rows_for(job: str, baseline: dict, runs: dict, ceiling: tuple[str, float], files: int) -> list[dict]:
    base = files / baseline["seconds"]
    what = {"preprocess": "process_batch loop (process_file + Parquet shards)",
            "label": "predict_many loop, 1 torch thread"}[job]
    rows = [{"job": job, "what": f"baseline: {what}, 1 process, no Ray", "wall": baseline["seconds"], "rate": base,
             "x": 1.0, "job_rate": base, "job_x": 1.0, "steady": base, "steady_x": 1.0,
             "load": baseline["load_1min"], "missing": baseline.get("errors", 0)}]
    for key, name in CONFIGS:
        if key not in runs:
            continue
        r = runs[key][job]
        job_rate = files / r["job_seconds"] if r["job_seconds"] else None
        rows.append({"job": job, "what": name, "wall": r["wall"], "rate": files / r["wall"],
                     "x": files / r["wall"] / base, "job_rate": job_rate, "job_x": job_rate and job_rate / base,
                     "steady": r["steady"], "steady_x": r["steady"] and r["steady"] / base,
                     "overhead": r["job_seconds"] and r["wall"] - r["job_seconds"], "load": r["load_1min"],
                     "missing": r["missing"]})
    rows.append({"job": job, "what": f"reference, not a run: {ceiling[0]}", "steady": ceiling[1],
                 "steady_x": ceiling[1] / base})
    return rows


COLUMNS = [("job", "job"), ("what", "configuration"), ("wall", "wall s"), ("rate", "files/s end to end"),
           ("x", "× baseline"), ("job_rate", "files/s job clock"), ("job_x", "× baseline"),
           ("steady", "files/s after 1st output"), ("steady_x", "× baseline"),
           ("overhead", "wall − job clock s"), ("load", "load (1 min) at start"), ("missing", "files missing")]


def report(facts: dict, rows: list[dict], runs: dict) -> str:
    notes = [
        "- **files/s end to end**: files ÷ wall clock of the whole job as a user waits for it. Embedded rows: a fresh "
        "`python jobs/<job>.py --num-cpus N` process (interpreter, imports, Ray start-up, the job, Ray shutdown). "
        "Cluster rows: `ray job submit` (CLI, working-dir upload, driver start on the head, the job); the cluster "
        "is already up, as on a real cluster. Baseline rows: the loop alone, warm (imports done, one file untimed).",
        "- **files/s job clock**: the job's own timer (the summary line's seconds: discovery, Ray Data planning, "
        "worker start-up and the work; not the interpreter, imports or Ray start/stop).",
        "- **files/s after 1st output**: from the first output the benchmark saw (a store shard / a CSV row) to the "
        "last; the labeling benchmark's steady rate. Left empty when under half the files came after the first "
        "output or within a second.",
        "- **wall − job clock**: what the job pays outside its own timer (Ray start/stop or job submission).",
    ]
    if "cluster" in runs:
        c = runs["cluster"]
        notes.append(f"- cluster start-up (two `ray start` nodes, not charged to any row): {c['start_s']:.1f} s; "
                     f"teardown {c['stop_s']:.1f} s.")
        for job in ("preprocess", "label"):
            p = c[job].get("submission")
            if p:
                notes.append(f"- cluster {job} job, wall clock by Ray's job times: CLI start-up + working-dir upload "
                             f"{p['cli_and_upload_s']:.1f} s, job supervisor + driver start-up/exit outside the "
                             f"job's clock {p['driver_outside_job_clock_s']:.1f} s, job clock {p['job_clock_s']:.1f} s,"
                             f" CLI noticing the end {p['cli_poll_s']:.1f} s.")
    notes.append("- Reference rows are ceilings, not runs: preprocessing's compute limit (decode + resample + "
                 "log-mel on one core, no writing) × the cores; labeling's network alone on random windows, batched, "
                 "best of 1 and 2 torch threads (one 10-s clip is one window). The machine is shared: see the loads.")
    return "\n".join(["# Scaling: 1 and 2 workers and two nodes against one process", "", facts_line(facts), "",
                      markdown_table(rows, COLUMNS), "", *notes])


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--files", type=int_at_least(2), default=200, help="10-s clips to generate (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated clips (default %(default)s)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per job (default %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)  # Ray on this machine, started by each job: that is what is measured
    cfg = FeatureConfig()
    began = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="langid-bench-scaling-")
    try:
        import torch

        facts = machine_facts(torch=torch.__version__, files=a.files,
                              input=f"generated {a.files} × 10 s, 22,050 Hz FLAC",
                              model="resnet18, random weights (untrained), default FeatureConfig",
                              loadavg_at_start=" ".join(f"{x:.2f}" for x in os.getloadavg()))
        print(f"generating {a.files} clips in {tmp}/corpus ...", file=sys.stderr)
        corpus = make_corpus(os.path.join(tmp, "corpus"), a.files, a.seed)
        clips = os.path.join(corpus, "train", "train")
        paths = usable_paths(corpus)
        model = random_model(os.path.join(tmp, "model"), cfg)

        print("baselines (one process, no Ray) ...", file=sys.stderr)
        load = load_average()
        pre_base = bench_in_process(corpus, os.path.join(tmp, "store-baseline"), cfg, False, PREPROCESS_BATCH)
        pre_base["load_1min"] = load
        load = load_average()
        lab_base = bench_predict_loop(model, paths)
        lab_base["load_1min"] = load
        limit = bench_compute_limit(paths[:min(len(paths), 50)], cfg)
        network = max(bench_limit(model, LIMIT_WINDOWS, LABEL_BATCH), key=lambda r: r["windows_per_s"])

        shared = dict(tmp=tmp, corpus=corpus, clips=clips, model=model, files=len(paths))
        runs = {f"embedded-{n}": run_embedded(n, a.timeout, **shared) for n in (1, 2)}
        runs["cluster"] = run_cluster(a.timeout, **shared)

        facts["loadavg_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        facts["benchmark_seconds"] = round(time.perf_counter() - began)
        rows = (rows_for("preprocess", pre_base, runs, (f"compute limit, 1 core × {cpu_count()}",
                                                        limit["clips_per_cpu_s"] * cpu_count()), len(paths))
                + rows_for("label", lab_base, runs, (f"network alone, {network['threads']} torch thread(s)",
                                                     network["windows_per_s"]), len(paths)))
        markdown = report(facts, rows, runs)
        print(markdown)
        md, js = write_results("scaling", markdown, {
            "facts": facts, "rows": rows, "runs": runs, "compute_limit": limit, "network_limit": network,
            "baselines": {"preprocess": pre_base, "label": lab_base}})
        print(f"\nwritten: {md}, {js}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
