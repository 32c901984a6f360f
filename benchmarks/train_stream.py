#!/usr/bin/env python
"""Training at the Kaggle set's size: memory, throughput and time to the first batch of the streamed training data.

    python benchmarks/train_stream.py [--sizes 2000,20000,73080] [--steps 20] [--arch resnet18] [--quick]

Stores of 10-s windows (64 x 1001 log-mel, the default features), generated and written through the store's own
writer (tests/support/generated_store.py), one window per clip and 32 windows per shard as preprocessing writes
them; kept in --work between runs (the 73,080-window store is 19 GB). Each row is one Ray Train run of a fixed
number of real training steps (forward, backward, Adam) in a worker that reads either

- the stream (what `langid train` does): Ray Data over the shards, Ray Train's equal split, a shuffle buffer, or
- the old in-memory loader (the baseline, as training read stores before): its share of the split read whole,
  float32, then a float16 copy, then a torch DataLoader.

Memory: the worker's peak private (RssAnon) and shared (RssShmem: object-store pages) resident bytes, sampled
every 10 ms inside it; the whole job's peak PSS (driver, Ray's GCS and raylet, every worker), sampled every
0.5 s from /proc. Throughput: clips/s over the steps after the warm-up ones, both loaders in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import suppress

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import numpy as np  # noqa: E402

from common import Poller, cpu_count, facts_line, machine_facts, markdown_table, write_results  # noqa: E402

from langid.config import FeatureConfig  # noqa: E402

GIB = 1024 ** 3
VALID_FRACTION = 0.1


# ---------------------------------------------------------------- memory readings

def memory_status(pid: str = "self") -> dict:
    """Resident bytes of a process by kind: private (RssAnon) and shared memory (RssShmem)."""
    # read from /proc (Linux): psutil's `shared` adds the file-backed pages (RssFile) to RssShmem
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssShmem:")):
                key, kb = line.split()[:2]
                out[key[:-1]] = int(kb) * 1024
    return out


def tree_pss() -> int:
    """Proportional set size of this process and every descendant (shared pages counted once in all)."""
    import psutil
    from common import process_tree

    total = 0
    for p in process_tree():
        with suppress(psutil.Error):  # the process ended meanwhile
            total += p.memory_full_info().pss
    return total


class Peak(Poller):
    """The largest value of each key of `read()` (a dict of numbers), sampled every `every` seconds."""

    def __init__(self, read, every: float):
        super().__init__(every)
        self.read, self.peak = read, {}

    def poll(self):
        for k, v in self.read().items():
            self.peak[k] = max(self.peak.get(k, 0), v)

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.poll()


# ---------------------------------------------------------------- the baseline: the old in-memory loader

def in_memory_share(store_uri: str, labels: list, rank: int, world: int, seed: int = 0):
    """What training did before: the whole train split as one Arrow table (float32), this rank's equal share of a
    seeded permutation, then a float16 array of it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from langid.store import WINDOWS, Store, logmel_matrix

    table = Store(store_uri).read(WINDOWS, filters=(pc.field("split") == "train") & pc.field("language").isin(labels))
    per = table.num_rows // world
    table = table.take(pa.array(np.random.default_rng(seed).permutation(table.num_rows)[rank * per:(rank + 1) * per]))
    X = logmel_matrix(table).astype(np.float16)
    y = pc.index_in(table.column("language"), pa.array(labels)).to_numpy(zero_copy_only=False).astype(np.int64)
    return X, y


def in_memory_loader(X: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
    """fastai's DataLoader over the arrays, float32 per window, shuffled, as training built it before."""
    import torch
    from fastai.data.load import DataLoader

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return torch.from_numpy(X[i].astype(np.float32))[None], torch.tensor(y[i])

    loader = DataLoader(Windows(), bs=batch_size, shuffle=True, drop_last=True, num_workers=0)
    loader.rng.seed(seed)
    return loader


# ---------------------------------------------------------------- the worker

def bench_loop(config: dict) -> None:
    """`steps` training steps on `loader` ("stream" or "memory"); reports time to the first batch, clips/s after
    the warm-up steps, and this worker's peak resident bytes."""
    import ray.train
    import torch
    import torch.nn as nn

    from langid.model import LangIdNet
    from langid.trainset import TRAIN, StreamLoader

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data, bs, steps, warmup = config["data"], config["batch_size"], config["steps"], config["warmup"]
    torch.manual_seed(0)
    torch.set_num_threads(config["threads"])
    with Peak(lambda: memory_status(), 0.01) as peak:
        before = memory_status()
        model = LangIdNet(config["arch"], len(data.labels))
        if world > 1:
            model = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        if config["loader"] == "stream":
            loader = StreamLoader(ray.train.get_dataset_shard(TRAIN), data.train_windows // world, bs,
                                  shuffle_buffer=config["shuffle_buffer"], seed=0, rank=rank)
        else:
            loader = in_memory_loader(*in_memory_share(config["store"], data.labels, rank, world), bs, seed=rank)
        first = timed_from = None
        for i, (x, yb) in enumerate(loader):
            if i == 0:
                first = time.perf_counter() - t0
            if i == warmup:
                timed_from = time.perf_counter()
            if i == steps:
                break
            loss = nn.functional.cross_entropy(model(x), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds = time.perf_counter() - timed_from
    if rank == 0:  # (Ray Train keeps metrics only with checkpoints)
        with open(config["metrics"], "w") as f:
            json.dump({"first_batch_s": first, "clips_s": (steps - warmup) * bs * world / seconds,
                       "worker_private": peak.peak["RssAnon"], "worker_shared": peak.peak["RssShmem"],
                       "worker_private_before": before["RssAnon"]}, f)
    ray.train.report({"rank": rank})


def run(store_uri: str, loader: str, workers: int, a: argparse.Namespace, tmp: str) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from langid.config import TrainConfig
    from langid.training import ingest_options, training_datasets
    from langid.trainset import training_data

    data = training_data(store_uri)
    tc = TrainConfig(store=store_uri, output=tmp, seed=0, shuffle_buffer=a.shuffle_buffer, workers=workers,
                     batch_size=a.batch_size)
    cpus = max(1, cpu_count() // workers)
    name = f"bench-{loader}-{workers}-{time.time_ns()}"
    os.makedirs(tmp, exist_ok=True)
    config = {"metrics": os.path.join(tmp, f"{name}.json"), "data": data, "store": store_uri, "loader": loader, "arch": a.arch, "batch_size": a.batch_size,
              "steps": a.steps, "warmup": a.warmup, "threads": cpus, "shuffle_buffer": a.shuffle_buffer}
    trainer = TorchTrainer(
        bench_loop, train_loop_config=config,
        datasets=training_datasets(tc, data) if loader == "stream" else None,
        dataset_config=ray.train.DataConfig(execution_options=ingest_options(tc, data)),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name=name, storage_path=tmp,
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    t0 = time.perf_counter()
    with Peak(lambda: {"pss": tree_pss()}, 0.5) as job:
        result = trainer.fit()
    if result.error:
        raise result.error
    with open(config["metrics"]) as f:
        metrics = json.load(f)
    return {**metrics, "job_pss": job.peak["pss"], "seconds": time.perf_counter() - t0,
            "train_windows": data.train_windows}


def ensure_store(work: str, windows: int) -> str:
    """The generated store of `windows` 10-s windows (10% validation), written once and kept in `work`."""
    from support.generated_store import write_store

    uri = os.path.join(work, f"store-{windows}")
    done = os.path.join(uri, ".complete")
    if not os.path.exists(done):
        import shutil

        shutil.rmtree(uri, ignore_errors=True)
        valid = int(windows * VALID_FRACTION)
        t0 = time.perf_counter()
        write_store(uri, train=windows - valid, valid=valid, cfg=FeatureConfig(), shard_windows=32,
                    progress=lambda n: print(f"\rwriting store of {windows:,} windows: {n:,}", end="", flush=True))
        print(f" ({time.perf_counter() - t0:.0f} s)")
        open(done, "w").close()
    return uri


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2000,20000,73080", help="windows per store (comma-separated)")
    p.add_argument("--memory-baseline-up-to", type=int, default=20000,
                   help="run the in-memory loader only on stores up to this many windows (default %(default)s)")
    p.add_argument("--throughput-size", type=int, default=2000, help="store for the throughput rows")
    p.add_argument("--workers", default="1,2", help="worker counts for the throughput rows")
    p.add_argument("--steps", type=int, default=20, help="training steps per run (default %(default)s)")
    p.add_argument("--warmup", type=int, default=4, help="steps not timed (default %(default)s)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shuffle-buffer", type=int, default=1024)
    p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "langid-bench-stream"),
                   help="where the generated stores are kept (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="stores of 200 and 800 windows, 8 steps")
    a = p.parse_args(argv)
    sizes = [200, 800] if a.quick else [int(s) for s in a.sizes.split(",")]
    if a.quick:
        a.steps, a.warmup, a.throughput_size = 8, 2, 200

    import ray

    from langid.runtime import init_ray, quiet_ray_data

    os.makedirs(a.work, exist_ok=True)
    stores = {n: ensure_store(a.work, n) for n in sorted(set(sizes + [a.throughput_size]))}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "benchmarks"), os.environ.get("PYTHONPATH")]))  # workers import this module
    init_ray(num_cpus=cpu_count())
    quiet_ray_data()
    tmp = os.path.join(a.work, "runs")
    memory_rows = []
    for n in sizes:
        for loader in ("stream", "memory"):
            if loader == "memory" and n > a.memory_baseline_up_to:
                memory_rows.append({"windows": n, "loader": "in memory (baseline)",
                                    "note": f"not run: the split alone is {n * 64 * 1001 * 6 / GIB:.0f} GiB "
                                            "(float32 + float16 copy)"})
                continue
            try:
                r = run(stores[n], loader, 1, a, tmp)
            except Exception as e:  # the old loader on a large store: Ray's memory monitor kills the worker
                if loader == "stream":
                    raise
                reason = "out of memory" if "memory" in str(e).lower() else type(e).__name__
                memory_rows.append({"windows": n, "loader": "in memory (baseline)",
                                    "note": f"failed: {reason} (the worker was killed)"})
                print(json.dumps(memory_rows[-1]), flush=True)
                continue
            memory_rows.append({"windows": n, "loader": "stream" if loader == "stream" else "in memory (baseline)",
                                "worker_private_gib": r["worker_private"] / GIB,
                                "worker_shared_gib": r["worker_shared"] / GIB, "job_pss_gib": r["job_pss"] / GIB,
                                "first_batch_s": r["first_batch_s"], "clips_s": r["clips_s"], "note": ""})
            print(json.dumps(memory_rows[-1]), flush=True)
    stream_rows = [r for r in memory_rows if r["loader"] == "stream"]
    flat = {"peak_job_pss_growth_gib": stream_rows[-1]["job_pss_gib"] - stream_rows[0]["job_pss_gib"],
            "peak_worker_growth_gib": (stream_rows[-1]["worker_private_gib"] + stream_rows[-1]["worker_shared_gib"])
            - (stream_rows[0]["worker_private_gib"] + stream_rows[0]["worker_shared_gib"])}

    speed_rows = []
    for w in [int(x) for x in a.workers.split(",")]:
        base = run(stores[a.throughput_size], "memory", w, a, tmp)
        mine = run(stores[a.throughput_size], "stream", w, a, tmp)
        speed_rows.append({"workers": w, "memory_clips_s": base["clips_s"], "stream_clips_s": mine["clips_s"],
                           "ratio": mine["clips_s"] / base["clips_s"]})
        print(json.dumps(speed_rows[-1]), flush=True)
    ray.shutdown()

    facts = machine_facts(arch=a.arch, batch_size=a.batch_size, steps=a.steps, warmup_steps=a.warmup,
                          shuffle_buffer=a.shuffle_buffer, window="10 s, 64 x 1001 log-mel, 32 per shard")
    md = "\n".join([
        "# Training data at the Kaggle set's size: streamed against read into memory", "",
        facts_line(facts), "",
        f"## Memory and time to the first batch (1 worker, {a.steps} steps)", "",
        markdown_table(memory_rows, [("windows", "windows in store"), ("loader", "loader"),
                                     ("worker_private_gib", "worker private GiB"),
                                     ("worker_shared_gib", "worker shared GiB"),
                                     ("job_pss_gib", "whole job PSS GiB"), ("first_batch_s", "first batch s"),
                                     ("clips_s", "clips/s"), ("note", "")]),
        "",
        f"Streamed, from {stream_rows[0]['windows']:,} to {stream_rows[-1]['windows']:,} windows: whole-job peak "
        f"{flat['peak_job_pss_growth_gib']:+.2f} GiB, worker peak (private + shared) "
        f"{flat['peak_worker_growth_gib']:+.2f} GiB.",
        "",
        f"## Throughput on the {a.throughput_size:,}-window store (clips/s, steps {a.warmup + 1}-{a.steps})", "",
        markdown_table(speed_rows, [("workers", "workers"), ("memory_clips_s", "in memory (baseline)"),
                                    ("stream_clips_s", "stream"), ("ratio", "× baseline")]),
    ])
    print(md)
    write_results("train_stream", md, {"facts": facts, "memory": memory_rows, "flat": flat, "speed": speed_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
