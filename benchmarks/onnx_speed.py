#!/usr/bin/env python
"""ONNX Runtime against torch: the same trained-model forward pass, per window and per clip, on CPU.

    python benchmarks/onnx_speed.py            # batches 8,16,32,64 at 1 and 2 threads (a few minutes)
    python benchmarks/onnx_speed.py --quick    # a smoke run, not a measurement

The model is benchmarks/label.py's: a resnet18 LangIdNet with random weights saved by `save_model` (speed does not
depend on training), loaded with `load_model(backend="torch")` and `load_model(backend="onnx")` (model.onnx
exported on that first load, timed). Both score the same random windows of the default FeatureConfig through
`logprobs`, temperature and log-softmax included, after a warm-up; each measurement alternates the two backends
and keeps the fastest of its repeats (the machine is shared: see the load averages). Per clip: one 10-s clip's
windows (at the default window length) alone, as `predict` on one file runs them. The goal: ONNX Runtime at least
1.5x faster than torch on CPU.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from common import facts_line, load_average, machine_facts, markdown_table, write_results  # noqa: E402
from label import random_model  # noqa: E402

from langid.config import FeatureConfig  # noqa: E402

GOAL = 1.5
CLIP_SECONDS = 10.0


def timed(fn, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of `repeats` calls."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - w0, time.process_time() - c0))
    return best


def measure(idents: dict, specs: np.ndarray, batch: int, repeats: int) -> dict:
    """Per-backend (wall, CPU) of scoring `specs` `batch` at a time; backends alternate within each repeat."""
    for ident in idents.values():
        ident.logprobs(specs[:batch], batch)  # warm-up: allocations, kernels, ORT's buffers for this shape
    best = {name: (float("inf"), 0.0) for name in idents}
    for _ in range(repeats):
        for name, ident in idents.items():
            best[name] = min(best[name], timed(lambda: ident.logprobs(specs, batch), 1))
    return best


def clip_windows(cfg: FeatureConfig) -> int:
    from langid.features import window_features

    return len(window_features(np.zeros(int(CLIP_SECONDS * cfg.sample_rate), np.float32), cfg, source_dbfs=0.0)[0])


def run(a: argparse.Namespace, tmp: str, facts: dict) -> tuple[str, dict]:
    import torch

    from langid.inference import load_model

    cfg = FeatureConfig()
    folder = random_model(os.path.join(tmp, "model"), cfg)
    t0 = time.perf_counter()
    load_model(folder, "cpu", backend="onnx")
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_model(folder, "cpu", backend="onnx")
    load_s = time.perf_counter() - t0
    specs = np.random.default_rng(a.seed).random((a.windows, *cfg.shape), dtype=np.float32)
    per_clip = clip_windows(cfg)
    rows, clips, agreement = [], [], None
    for threads in a.threads:
        torch.set_num_threads(threads)
        idents = {"torch": load_model(folder, "cpu", backend="torch"),
                  "onnx": load_model(folder, "cpu", threads=threads, backend="onnx")}
        if agreement is None:
            p = {name: np.exp(ident.logprobs(specs[:16])) for name, ident in idents.items()}
            agreement = float(np.abs(p["torch"] - p["onnx"]).max())
        for batch in a.batches:
            best = measure(idents, specs, batch, a.repeats)
            rows.append({"threads": threads, "batch": batch, "windows": len(specs),
                         "torch_ms": 1e3 * best["torch"][0] / len(specs), "onnx_ms": 1e3 * best["onnx"][0] / len(specs),
                         "torch_cpu_ms": 1e3 * best["torch"][1] / len(specs),
                         "onnx_cpu_ms": 1e3 * best["onnx"][1] / len(specs),
                         "speedup": best["torch"][0] / best["onnx"][0],
                         "cpu_speedup": best["torch"][1] / best["onnx"][1], "load": load_average()})
            print(rows[-1], flush=True)
        best = measure(idents, specs[:per_clip], per_clip, a.clip_repeats)
        clips.append({"threads": threads, "windows": per_clip, "torch_ms": 1e3 * best["torch"][0],
                      "onnx_ms": 1e3 * best["onnx"][0], "speedup": best["torch"][0] / best["onnx"][0],
                      "load": load_average()})
        print(clips[-1], flush=True)
    facts.update(load_at_end=load_average(), export_s=round(export_s, 2), onnx_load_s=round(load_s, 2),
                 max_probability_difference=f"{agreement:.1e}")
    window_columns = [("threads", "threads"), ("batch", "batch"), ("torch_ms", "torch ms/window"),
                      ("onnx_ms", "ORT ms/window"), ("speedup", "speed-up ORT/torch"),
                      ("torch_cpu_ms", "torch CPU ms/window"), ("onnx_cpu_ms", "ORT CPU ms/window"),
                      ("cpu_speedup", "speed-up in CPU time"), ("load", "load avg")]
    clip_columns = [("threads", "threads"), ("windows", "windows per clip"), ("torch_ms", "torch ms/clip"),
                    ("onnx_ms", "ORT ms/clip"), ("speedup", "speed-up ORT/torch"), ("load", "load avg")]
    goal_lines = []
    for threads in a.threads:
        mine = [r for r in rows if r["threads"] == threads]
        fastest = min(mine, key=lambda r: r["onnx_ms"])
        worst = min(r["speedup"] for r in mine)
        clip = next(c for c in clips if c["threads"] == threads)
        verdict = "PASS" if min(worst, clip["speedup"]) >= GOAL else "MISS"
        goal_lines.append(f"- {verdict}: {threads} thread(s): ORT {worst:.2f}–{max(r['speedup'] for r in mine):.2f}× "
                          f"torch per window over batches {','.join(str(b) for b in a.batches)} "
                          f"({clip['speedup']:.2f}× per clip); fastest ORT batch {fastest['batch']} "
                          f"({fastest['onnx_ms']:.1f} ms/window); goal ≥ {GOAL}×.")
    md = "\n".join([
        "# ONNX Runtime vs torch (trained-model forward pass, CPU)", "", facts_line(facts), "",
        "## Per window", "", markdown_table(rows, window_columns), "",
        f"## Per clip ({CLIP_SECONDS:g} s: its windows scored alone)", "", markdown_table(clips, clip_columns), "",
        "resnet18 with random weights, default FeatureConfig (64 mels × 1,001 frames, 10-s windows); "
        "`LanguageIdentifier.logprobs` (torch, eager, `torch.set_num_threads`) against `OnnxIdentifier.logprobs` "
        "(ONNX Runtime CPU provider, `intra_op_num_threads`, graph optimisation ALL), both on the same random "
        "windows after a warm-up; fastest of the repeats, wall-clock; CPU ms is this process's CPU time. "
        "The machine is shared with other work: the load averages say how much.", "",
        "## Goal", "", *goal_lines])
    return md, {"facts": facts, "per_window": rows, "per_clip": clips}


def parse_args(argv=None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--batches", type=ints, default=[8, 16, 32, 64], help="batch sizes (default 8,16,32,64)")
    p.add_argument("--threads", type=ints, default=[1, 2], help="thread counts (default 1,2)")
    p.add_argument("--windows", type=int, default=64, help="windows per measurement (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per measurement; the fastest counts "
                                                          "(default %(default)s)")
    p.add_argument("--clip-repeats", type=int, default=10, help="repeats of the per-clip timing (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few windows, not a measurement")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.quick:
        a.batches, a.windows, a.repeats, a.clip_repeats = [8, 16], 16, 1, 2
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    import onnxruntime
    import torch

    facts = machine_facts(torch=torch.__version__, onnxruntime=onnxruntime.__version__, model="resnet18",
                          windows=a.windows, repeats=a.repeats, quick=a.quick)
    tmp = tempfile.mkdtemp(prefix="langid-bench-onnx-")
    try:
        md, data = run(a, tmp, facts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    name = "onnx-quick" if a.quick else "onnx"
    print(md)
    paths = write_results(name, md, data)
    print(f"\nwritten: {paths[0]} and {paths[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
