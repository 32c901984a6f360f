#!/usr/bin/env bash
# The CUDA path of `langid train`, for a machine with a GPU (none was at hand where langid is developed):
# a few hundred steps of resnet152 with mixed precision on a generated store of 10-s windows, through the real
# training job (Ray Train, the streamed store, fastai's AMP, channels-last). Prints throughput and peak GPU memory.
#
#     bash benchmarks/gpu_check.sh [WINDOWS] [BATCH_SIZE]     (defaults 7200 and 32: 200 steps; about 5 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
make venv >/dev/null
WINDOWS=${1:-7200} BATCH=${2:-32} .venv/bin/python - <<'PY'
import os, sys, tempfile, time
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "tests")]
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: CUDA is not available here")
from langid.config import FeatureConfig, Stage, TrainConfig
from langid.runtime import init_ray, quiet_ray_data
from langid.training import run_training
from support.generated_store import write_store

windows, batch = int(os.environ["WINDOWS"]), int(os.environ["BATCH"])
work = tempfile.mkdtemp(prefix="langid-gpu-check-")
t0 = time.time()
write_store(f"{work}/store", train=windows, valid=windows // 10, cfg=FeatureConfig())
print(f"store: {windows:,} training windows of 10 s ({time.time() - t0:.0f} s)")
init_ray()
quiet_ray_data()
import ray
cpus = int(ray.cluster_resources()["CPU"])
tc = TrainConfig(store=f"{work}/store", output=f"{work}/model", arch="resnet152", batch_size=batch, gpu=True,
                 cpus_per_worker=max(1, cpus - 1), max_failures=0,
                 stages=[Stage("head", 1, 1e-2, freeze=True), Stage("unfrozen", 1, 1e-3, freeze=False)])
assert tc.mixed_precision, "AMP is on by default on GPU"
res = run_training(tc, pretrained=False, log=print)
for row in res["history"]:
    print(f"{row['stage']}: {windows // batch} steps, {windows / row['seconds']:.1f} clips/s, "
          f"peak GPU memory {row.get('gpu_memory_gib', float('nan')):.2f} GiB, valid loss {row['valid_loss']:.3f}")
print(f"gpu_check: ok ({torch.cuda.get_device_name(0)}, torch {torch.__version__}); model in {work}/model")
PY
