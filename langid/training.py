"""The staged fine-tune (the write-up's three stages) as a fastai Learner inside Ray Train workers."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from langid.config import FeatureConfig
from langid.model import LangIdNet, layer_groups, save_model
from langid.store import WINDOWS, Store, StoreError, logmel_matrix
from langid.uris import StagedFolder, absolute_uri


@dataclass
class Stage:
    name: str
    epochs: int
    lr: float
    freeze: bool  # True: train the head only (fastai's freeze, BatchNorm stays trainable)
    lr_divisors: tuple = (1.0, 1.0, 1.0)  # per layer group: early body, late body, head

    def lrs(self) -> list[float]:
        return [self.lr / d for d in self.lr_divisors]


def default_schedule(epochs=(7, 12, 8), lrs=(1e-2, 1e-3, 1e-4), divisors=(9.0, 6.0, 1.0)) -> list[Stage]:
    """The write-up's schedule: head (lr 1e-2, 7), all layers at lr/9, lr/6, lr (12), head again (lr 1e-4, 8)."""
    return [
        Stage("head", epochs[0], lrs[0], freeze=True),
        Stage("unfrozen", epochs[1], lrs[1], freeze=False, lr_divisors=tuple(divisors)),
        Stage("head-again", epochs[2], lrs[2], freeze=True),
    ]


@dataclass
class TrainConfig:
    store: str
    output: str
    arch: str = "resnet152"
    stages: list = field(default_factory=default_schedule)
    batch_size: int = 32
    workers: int = 1
    gpu: bool = False
    cpus_per_worker: float = 1.0
    memory_per_worker: int = 0  # bytes reserved with Ray's scheduler; 0: none
    seed: int = 0
    spec_augment: bool = True
    max_failures: int = 2

    def to_dict(self) -> dict:
        return {**asdict(self), "stages": [asdict(s) for s in self.stages]}


# ---------- data ----------

def read_split(store_uri: str, split: str, labels: Optional[list[str]] = None, share: Optional[tuple] = None):
    """(X float16 (n, n_mels, frames), y int64, labels, table without logmel) for one split of a store.

    `share` = (rank, world, seed) keeps only that rank's part (see `partition`) before building the array.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    store = Store(store_uri)
    table = store.read(WINDOWS, filters=pc.field("split") == split)
    if labels is None:
        labels = sorted(set(table.column("language").to_pylist()))
    index = {lang: i for i, lang in enumerate(labels)}
    table = table.filter(pa.array([lang in index for lang in table.column("language").to_pylist()], pa.bool_()))
    if table.num_rows == 0:
        raise StoreError(f"{store_uri}: no windows in split {split!r} for languages {labels}")
    if share is not None:
        table = table.take(pa.array(partition(table.num_rows, *share)))
    X = logmel_matrix(table).astype(np.float16)
    y = np.array([index[lang] for lang in table.column("language").to_pylist()], dtype=np.int64)
    return X, y, labels, table.drop_columns(["logmel"])


def partition(n: int, rank: int, world: int, seed: int = 0) -> np.ndarray:
    """This rank's share of n items: a seeded permutation cut into equal parts (DDP needs equal batch counts)."""
    per = n // world
    return np.random.default_rng(seed).permutation(n)[rank * per:(rank + 1) * per]


class ArrayDataset(torch.utils.data.Dataset):
    def __init__(self, X: np.ndarray, y: np.ndarray):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(self.X[i].astype(np.float32))[None], torch.tensor(self.y[i])


def make_dataloaders(Xt, yt, Xv, yv, batch_size: int, device, seed: int = 0):
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader

    bs = max(1, min(batch_size, len(yt)))
    train = DataLoader(ArrayDataset(Xt, yt), bs=bs, shuffle=True, drop_last=True, num_workers=0)
    valid = DataLoader(ArrayDataset(Xv, yv), bs=batch_size, shuffle=False, num_workers=0)
    train.rng.seed(seed)
    return DataLoaders(train, valid, device=device)


# ---------- learner ----------

def spec_augment_callback(seed: int = 0):
    """SpecAugment-style masking and a random time shift on training batches (fastai callback)."""
    from fastai.callback.core import Callback

    class SpecAugment(Callback):
        order = 5

        def __init__(self):
            self.gen = torch.Generator().manual_seed(seed)

        def before_batch(self):
            if not self.training:
                return
            x = self.xb[0].clone()
            b, _, n_mels, frames = x.shape
            shift = int(torch.randint(0, frames, (1,), generator=self.gen))
            x = torch.roll(x, shifts=shift, dims=3)
            for _ in range(2):
                f0 = int(torch.randint(0, max(1, n_mels - n_mels // 8), (1,), generator=self.gen))
                t0 = int(torch.randint(0, max(1, frames - frames // 10), (1,), generator=self.gen))
                x[:, :, f0:f0 + n_mels // 8, :] = 0
                x[:, :, :, t0:t0 + frames // 10] = 0
            self.learn.xb = (x,)

    return SpecAugment()


def make_learner(model: nn.Module, dls, path: str, cbs=()):
    import fastai.callback.schedule  # noqa: F401  (patches fit_one_cycle and lr_find onto Learner)
    from fastai.callback.progress import ProgressCallback
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    from fastai.optimizer import Adam

    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=Adam, splitter=layer_groups,
                    metrics=accuracy, path=path, cbs=list(cbs))
    for cb in [cb for cb in learn.cbs if isinstance(cb, ProgressCallback)]:
        learn.remove_cb(cb)  # workers print one line per epoch instead of redrawing bars through Ray's log
    learn.logger = lambda *_: None
    return learn


def apply_stage(learn, stage: Stage) -> list[float]:
    """Freeze or unfreeze for a stage and set its per-group learning rates; returns them."""
    if stage.freeze:
        learn.freeze()
    else:
        learn.unfreeze()
    lrs = stage.lrs()
    learn.opt.set_hyper("lr", lrs)
    return lrs


# ---------- checkpoint state ----------

def _plain(obj):
    """fastai's optimizer state with its fastcore containers turned into lists and dicts (weights_only-loadable)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "L":
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _state_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(_plain(obj), buf)
    return buf.getvalue()


def save_checkpoint_dir(folder: str, model: nn.Module, opt_state: dict, state: dict, best: dict) -> None:
    """A Ray Train checkpoint: current weights, optimizer state, progress, and each stage's best weights."""
    from safetensors.torch import save_file

    raw = getattr(model, "module", model)
    save_file({k: v.detach().cpu().contiguous() for k, v in raw.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "optimizer.pt"), "wb") as f:
        f.write(_state_bytes(opt_state))
    for stage_name, weights in best.items():
        save_file(weights, os.path.join(folder, f"best-{stage_name}.safetensors"))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f, indent=2)


def load_checkpoint_dir(folder: str) -> tuple[dict, Optional[dict], dict, dict]:
    """(weights, optimizer state or None, progress state, best weights per stage) from a checkpoint folder."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    opt_path = os.path.join(folder, "optimizer.pt")
    opt_state = torch.load(opt_path, map_location="cpu", weights_only=True) if os.path.exists(opt_path) else None
    best = {}
    for name in os.listdir(folder):
        if name.startswith("best-") and name.endswith(".safetensors"):
            best[name[len("best-"):-len(".safetensors")]] = load_file(os.path.join(folder, name))
    return weights, opt_state, state, best


# ---------- the worker loop ----------

def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker: data shard, fastai Learner, the stages, per-epoch report + checkpoint."""
    import ray.train
    import ray.train.torch as rtt
    from fastai.callback.core import Callback
    from fastai.learner import Recorder

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = config["train_config"]
    stages = [Stage(**s) for s in tc["stages"]]
    torch.manual_seed(tc["seed"])
    torch.set_num_threads(max(1, int(tc["cpus_per_worker"])))
    device = rtt.get_device()

    Xt, yt, labels, _ = read_split(tc["store"], "train", config["labels"], share=(rank, world, tc["seed"]))
    Xv, yv, _, _ = read_split(tc["store"], "valid", labels)

    state_dict = ray.get(config["pretrained"]) if config.get("pretrained") is not None else None
    model = LangIdNet(tc["arch"], len(labels), resnet_state=state_dict).to(device)
    del state_dict

    progress = {"stage": 0, "epoch": 0, "history": [], "best": {}}
    opt_state, best_weights = None, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            weights, opt_state, progress, best_weights = load_checkpoint_dir(d)
        model.load_state_dict(weights)
        if rank == 0:
            print(f"resuming from checkpoint: stage {progress['stage'] + 1}, {progress['epoch']} epochs done in it")

    dls = make_dataloaders(Xt, yt, Xv, yv, tc["batch_size"], device, seed=tc["seed"] + rank)
    cbs = [spec_augment_callback(tc["seed"] + rank)] if tc["spec_augment"] else []
    workdir = tempfile.mkdtemp(prefix="langid-learner-")
    learn = make_learner(model, dls, workdir, cbs)

    class ReportEpoch(Callback):
        order = Recorder.order + 1

        def __init__(self, stage_index: int, start_epoch: int):
            self.stage_index, self.start_epoch, self.t0 = stage_index, start_epoch, time.time()

        def before_epoch(self):
            self.t0 = time.time()

        def after_epoch(self):
            if self.epoch < self.start_epoch:  # fastai still calls after_epoch for the epochs a resume skips
                return
            stage = stages[self.stage_index]
            train_loss, valid_loss, acc = (float(v) for v in self.learn.recorder.values[-1][:3])
            row = {"stage": stage.name, "stage_index": self.stage_index + 1, "epoch": self.epoch + 1,
                   "global_epoch": len(progress["history"]) + 1, "train_loss": train_loss, "valid_loss": valid_loss,
                   "accuracy": acc, "lr": float(self.learn.opt.hypers[-1]["lr"]),
                   "seconds": round(time.time() - self.t0, 2)}
            progress["history"].append(row)
            progress["stage"], progress["epoch"] = self.stage_index, self.epoch + 1
            best = progress["best"].get(stage.name)
            raw = getattr(self.learn.model, "module", self.learn.model)
            if best is None or (acc, -valid_loss) > (best["accuracy"], -best["valid_loss"]):
                progress["best"][stage.name] = {"epoch": self.epoch + 1, "accuracy": acc, "valid_loss": valid_loss}
                best_weights[stage.name] = {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()}
            if self.epoch + 1 == stage.epochs:  # stage done: the next one starts at its epoch 0
                progress["stage"], progress["epoch"] = self.stage_index + 1, 0
            metrics = {k: row[k] for k in ("stage_index", "epoch", "train_loss", "valid_loss", "accuracy")}
            if rank == 0:
                print(f"stage {self.stage_index + 1}/{len(stages)} ({stage.name}) epoch {self.epoch + 1}/{stage.epochs}: "
                      f"train_loss {train_loss:.4f} valid_loss {valid_loss:.4f} accuracy {acc:.4f} ({row['seconds']} s)",
                      flush=True)
                with tempfile.TemporaryDirectory() as d:
                    save_checkpoint_dir(d, self.learn.model, self.learn.opt.state_dict(), progress, best_weights)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)

    for i in range(progress["stage"], len(stages)):
        stage = stages[i]
        start_epoch = progress["epoch"] if i == progress["stage"] else 0
        if stage.epochs <= 0 or start_epoch >= stage.epochs:
            continue
        learn.model = getattr(learn.model, "module", learn.model)
        lrs = apply_stage(learn, stage)
        if opt_state is not None and start_epoch > 0:  # resuming inside a stage: the optimizer continues
            from fastcore.foundation import L

            learn.opt.load_state_dict({"state": opt_state["state"], "hypers": L(opt_state["hypers"])})
            learn.opt.set_hyper("lr", lrs)
        opt_state = None
        if world > 1:  # rewrap per stage: DDP only reduces parameters that train in this stage
            ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
            learn.model = nn.parallel.DistributedDataParallel(learn.model, **ddp_kwargs)
        learn.fit_one_cycle(stage.epochs, lr_max=lrs, start_epoch=start_epoch, cbs=[ReportEpoch(i, start_epoch)])
    shutil.rmtree(workdir, ignore_errors=True)


def lr_find(tc: TrainConfig, pretrained: bool = True, weights_file: Optional[str] = None) -> dict:
    """fastai's learning-rate finder, in this process, on the head-only stage; writes lr_find.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from langid.model import build_model, default_device

    labels = store_labels(tc.store)
    Xt, yt, _, _ = read_split(tc.store, "train", labels)
    Xv, yv, _, _ = read_split(tc.store, "valid", labels)
    device = default_device(tc.gpu)
    model = build_model(tc.arch, len(labels), pretrained, weights_file).to(device)
    workdir = tempfile.mkdtemp(prefix="langid-lrfind-")
    learn = make_learner(model, make_dataloaders(Xt, yt, Xv, yv, tc.batch_size, device, tc.seed), workdir)
    learn.freeze()
    suggestion = learn.lr_find(show_plot=False)
    os.makedirs(tc.output, exist_ok=True)
    learn.recorder.plot_lr_find()
    plot = os.path.join(tc.output, "lr_find.png")
    plt.savefig(plot, dpi=100)
    plt.close("all")
    shutil.rmtree(workdir, ignore_errors=True)
    return {"valley": float(suggestion.valley), "plot": plot}


# ---------- the driver ----------

def store_labels(store_uri: str) -> list[str]:
    """Languages of a store's training split (the model's classes), checked to be trainable."""
    import pyarrow.compute as pc

    store = Store(store_uri)
    store.read_config()
    table = store.read(WINDOWS, columns=["language", "split"])
    train = table.filter(pc.field("split") == "train")
    valid = table.filter(pc.field("split") == "valid")
    labels = sorted(set(train.column("language").to_pylist()))
    if len(labels) < 2:
        raise StoreError(f"{store_uri}: training needs at least two languages in the train split, found {labels}")
    if valid.num_rows == 0:
        raise StoreError(f"{store_uri}: no validation windows; preprocess with --valid-fraction > 0")
    return labels


def run_training(tc: TrainConfig, pretrained: bool = True, weights_file: Optional[str] = None, log=print) -> dict:
    """Train with Ray Train (resuming a previous run in the same output), then export the model folder."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from langid.model import imagenet_weights

    tc = replace(tc, store=absolute_uri(tc.store), output=absolute_uri(tc.output))
    output = tc.output
    cfg = Store(tc.store).read_config()
    labels = store_labels(tc.store)
    check_run_settings(output, tc, labels)
    state = None
    if pretrained:
        state, message = imagenet_weights(tc.arch, weights_file)
        log(message)
    else:
        log("random initialisation (--no-pretrained)")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train_config": tc.to_dict(), "labels": labels,
                           "pretrained": ray.put(state) if state is not None else None},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.workers, use_gpu=tc.gpu,
                                               resources_per_worker={"CPU": tc.cpus_per_worker,
                                                                     **({"memory": tc.memory_per_worker}
                                                                        if tc.memory_per_worker else {})}),
        torch_config=TorchConfig(backend="nccl" if tc.gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name="train", storage_path=f"{output}/ray",
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    t0 = time.time()
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        _, _, progress, best = load_checkpoint_dir(d)
    with StagedFolder(output) as local:  # a URI output is written locally, then copied
        res = export_model(local, tc, cfg, labels, progress, best, pretrained=state is not None,
                           seconds=time.time() - t0)
    return {**res, "output": output}


RESUME_KEYS = ("store", "arch", "stages", "batch_size", "seed", "spec_augment")


def check_run_settings(output: str, tc: TrainConfig, labels: list[str]) -> None:
    """Record a run's settings in OUTPUT/run.json; a rerun (which resumes) must ask for the same ones."""
    import pyarrow.fs as pafs

    from langid.uris import filesystem, write_atomic

    fs, root = filesystem(output)
    path = f"{root}/run.json"
    mine = json.loads(json.dumps({**{k: tc.to_dict()[k] for k in RESUME_KEYS}, "labels": labels}))
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            old = json.loads(f.read())
        diff = [k for k in mine if old.get(k) != mine[k]]
        if diff:
            raise ValueError(f"{output} holds a run with other settings ({', '.join(diff)}); rerun with the same "
                             "flags to resume it, or use a new --output")
        return
    write_atomic(fs, path, json.dumps(mine, indent=2).encode())


def calibrate(model: LangIdNet, store: str, labels: list[str], batch_size: int = 32) -> dict:
    """Temperature scaling fitted on the validation windows, so reported confidences mean what they say."""
    from langid.metrics import fit_temperature

    Xv, yv, _, _ = read_split(store, "valid", labels)
    model.eval()
    with torch.no_grad():
        logits = np.concatenate([model(torch.from_numpy(Xv[i:i + batch_size].astype(np.float32))[:, None]).numpy()
                                 for i in range(0, len(yv), batch_size)])
    t = fit_temperature(logits, yv)
    nll = lambda temp: float(-torch.log_softmax(torch.from_numpy(logits) / temp, 1)[np.arange(len(yv)), yv].mean())
    return {"temperature": t, "valid_nll_uncalibrated": nll(1.0), "valid_nll_calibrated": nll(t), "windows": len(yv)}


def export_model(output: str, tc: TrainConfig, cfg: FeatureConfig, labels: list[str], progress: dict,
                 best: dict, pretrained: bool, seconds: float) -> dict:
    """Model folder: the last stage's best weights as the model, each stage's best under stages/, history, curves."""
    from langid.plots import training_curves_png

    last = [s.name for s in tc.stages if s.epochs > 0][-1]
    meta = {
        "schedule": [asdict(s) for s in tc.stages],
        "training": {"batch_size": tc.batch_size, "workers": tc.workers, "gpu": tc.gpu, "seed": tc.seed,
                     "spec_augment": tc.spec_augment, "imagenet_pretrained": pretrained, "seconds": round(seconds, 1),
                     "store": tc.store},
        "best_per_stage": progress["best"],
        "metrics": {"valid": progress["best"][last]},
    }
    for stage_name, weights in best.items():
        model = LangIdNet(tc.arch, len(labels))
        model.load_state_dict(weights)
        folder = os.path.join(output, "stages", stage_name)
        save_model(model, folder, labels, cfg, {**meta, "metrics": {"valid": progress["best"][stage_name]}})
    model = LangIdNet(tc.arch, len(labels))
    model.load_state_dict(best[last])
    meta["calibration"] = calibrate(model, tc.store, labels)
    save_model(model, output, labels, cfg, meta)
    history = progress["history"]
    with open(os.path.join(output, "history.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    training_curves_png(history, os.path.join(output, "training_curves.png"))
    return {"output": output, "labels": labels, "history": history, "best": progress["best"]}
