#!/usr/bin/env python
"""Training throughput of the Ray Train job (clips/s) per architecture, with 1 and 2 workers.

    python benchmarks/train.py [--archs resnet18,resnet34,resnet50] [--workers 1,2] [--files 96] [--quick]

Each row is one real `run_training` on the same generated store (one unfrozen epoch plus warm-up), timed by the
job's own per-epoch clock; the baseline is the single-process fastai step on the same data, measured in the same
run, so the ratio shows what Ray Train and DDP cost or gain.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import facts_line, machine_facts, markdown_table, write_results  # noqa: E402
from preprocess import make_corpus  # noqa: E402

from langid.config import FeatureConfig  # noqa: E402


def in_process_clips_per_s(store: str, arch: str, batch_size: int, threads: int) -> float:
    """One unfrozen epoch of the fastai Learner in this process (no Ray), on the split read into memory: the
    baseline."""
    import torch
    from fastai.data.core import DataLoaders

    from langid.learner import make_learner
    from langid.model import LangIdNet
    from langid.trainset import training_data
    from train_stream import in_memory_loader, in_memory_share

    torch.set_num_threads(threads)
    labels = training_data(store).labels
    Xt, yt = in_memory_share(store, labels, 0, 1)
    train = in_memory_loader(Xt, yt, batch_size, seed=0)
    dls = DataLoaders(train, in_memory_loader(Xt[:batch_size], yt[:batch_size], batch_size, seed=0),
                      device=torch.device("cpu"))
    learn = make_learner(LangIdNet(arch, len(labels)), dls, tempfile.mkdtemp())
    learn.unfreeze()
    learn.fit(1, 1e-3)  # warm-up epoch (allocator, first-call costs)
    t0 = time.perf_counter()
    learn.fit(1, 1e-3)
    return (len(yt) // batch_size * batch_size) / (time.perf_counter() - t0)


def job_clips_per_s(store: str, arch: str, workers: int, batch_size: int, out: str) -> float:
    """Ray Train job: a warm-up epoch then a timed one; clips/s of the second from the job's history."""
    from langid.training import Stage, TrainConfig, run_training

    stages = [Stage("warm-up", 1, 1e-3, freeze=False), Stage("timed", 1, 1e-3, freeze=False)]
    tc = TrainConfig(store=store, output=out, arch=arch, stages=stages, batch_size=batch_size, workers=workers,
                     cpus_per_worker=max(1, os.cpu_count() // workers), max_failures=0, spec_augment=False)
    res = run_training(tc, pretrained=False, log=lambda m: None)
    timed = res["history"][-1]
    from langid.trainset import training_data

    n = training_data(store).train_windows // workers * workers  # the stream's equal split; no batch dropped
    return n / timed["seconds"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="resnet18,resnet34,resnet50", help="comma-separated architectures")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--files", type=int, default=96, help="10-s clips in the generated store")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="resnet18 only, 32 files")
    a = p.parse_args(argv)
    archs = ["resnet18"] if a.quick else a.archs.split(",")
    files = 32 if a.quick else a.files
    workers = [int(w) for w in a.workers.split(",")]

    import ray

    from langid.preprocess import run_preprocess
    from langid.runtime import init_ray, quiet_ray_data

    tmp = tempfile.mkdtemp(prefix="langid-bench-train-")
    init_ray(num_cpus=os.cpu_count())
    quiet_ray_data()
    store = os.path.join(tmp, "store")
    run_preprocess(make_corpus(os.path.join(tmp, "corpus"), files), store, FeatureConfig(), progress=False)
    rows = []
    for arch in archs:
        base = in_process_clips_per_s(store, arch, a.batch_size, os.cpu_count())
        rows.append({"arch": arch, "method": f"fastai in one process, {os.cpu_count()} threads (baseline)",
                     "clips_s": base, "ratio": 1.0})
        for w in workers:
            rate = job_clips_per_s(store, arch, w, a.batch_size, os.path.join(tmp, f"model-{arch}-{w}"))
            rows.append({"arch": arch, "method": f"Ray Train job, {w} worker(s)", "clips_s": rate, "ratio": rate / base})
            print(rows[-1], flush=True)
    ray.shutdown()
    facts = machine_facts(files=files, window="10 s, 64 x 1001 log-mel", batch_size=a.batch_size)
    md = "\n".join([
        "# Training throughput (clips/s, one unfrozen epoch, forward + backward + optimizer)", "",
        facts_line(facts), "",
        markdown_table(rows, [("arch", "architecture"), ("method", "method"), ("clips_s", "clips/s"),
                              ("ratio", "× baseline")]),
    ])
    print(md)
    write_results("train", md, {"facts": facts, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
