"""What every Ray Train worker runs: its share of the stream, a fastai Learner, the stages, a report per epoch."""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from fastai.callback.core import Callback
from fastai.learner import Recorder

from langid.checkpoint import load_checkpoint, save_checkpoint
from langid.config import Stage, TrainConfig
from langid.learner import SpecAugment, apply_stage, make_learner
from langid.model import LangIdNet
from langid.trainset import TRAIN, VALID, StreamLoader, TrainingData


@dataclass
class Progress:
    """Where a run stands (checkpointed every epoch): the next stage and epoch, history rows, best per stage."""

    stage: int = 0
    epoch: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=dict)
    best_weights: dict = field(default_factory=dict)  # stage name -> state dict, saved beside state.json

    def state(self) -> dict:
        return {"stage": self.stage, "epoch": self.epoch, "history": self.history, "best": self.best}

    def record(self, stages: list[Stage], stage_index: int, epoch: int, row: dict, model: nn.Module) -> None:
        """One finished epoch: its history row, the stage's best weights when it is the best so far."""
        stage = stages[stage_index]
        self.history.append(row)
        best = self.best.get(stage.name)
        if best is None or (row["accuracy"], -row["valid_loss"]) > (best["accuracy"], -best["valid_loss"]):
            self.best[stage.name] = {"epoch": epoch, "accuracy": row["accuracy"], "valid_loss": row["valid_loss"]}
            raw = getattr(model, "module", model)
            self.best_weights[stage.name] = {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()}
        self.stage, self.epoch = (stage_index + 1, 0) if epoch == stage.epochs else (stage_index, epoch)


class EpochMetrics(Callback):
    """Loss and accuracy summed over this rank's batches, then over all ranks: each rank validates only its share."""

    order = Recorder.order + 1

    def before_epoch(self):
        self.sums = torch.zeros(5, dtype=torch.float64)  # train loss, train n, valid loss, valid correct, valid n

    def after_batch(self):
        n = len(self.yb[0])
        loss = float(self.loss.detach()) * n
        if self.training:
            self.sums[:2] += torch.tensor([loss, n], dtype=torch.float64)
        else:
            correct = float((self.pred.argmax(dim=1) == self.yb[0]).sum())
            self.sums[2:] += torch.tensor([loss, correct, n], dtype=torch.float64)

    def totals(self, device: torch.device) -> tuple[float, float, float]:
        """(train loss, valid loss, valid accuracy) over every rank."""
        sums = self.sums
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sums = sums.to(device)  # NCCL reduces CUDA tensors only
            dist.all_reduce(sums)
            sums = sums.cpu()
        train_loss, train_n, valid_loss, correct, valid_n = sums.tolist()
        return train_loss / max(train_n, 1), valid_loss / max(valid_n, 1), correct / max(valid_n, 1)


@dataclass(frozen=True)
class Batches:
    """How far rank 0 is in an epoch (train then valid batches), for the driver's progress bar."""

    epoch: str
    done: int
    total: int


class ReportEpoch(Callback):
    """After each epoch of a stage: history row, progress, rank 0's line, checkpoint and `ray.train.report`."""

    order = EpochMetrics.order + 1

    def __init__(self, stages: list[Stage], stage_index: int, start_epoch: int, progress: Progress,
                 metrics: EpochMetrics, loaders: list[StreamLoader], rank: int, device: torch.device, say):
        self.stages, self.stage_index, self.start_epoch = stages, stage_index, start_epoch
        self.progress, self.metrics, self.loaders, self.rank, self.device = progress, metrics, loaders, rank, device
        self.say = say
        self.t0 = time.time()

    def before_epoch(self):
        self.t0 = self.told = time.time()
        for loader in self.loaders:  # a new shuffle per epoch of the run, the same on a rerun
            loader.set_epoch(len(self.progress.history))

    def after_batch(self):
        """Rank 0 tells how far the epoch is, at most once a second (the driver's bar)."""
        if self.rank != 0 or self.epoch < self.start_epoch or time.time() - self.told < 1:
            return
        self.told = time.time()
        train, valid = (len(loader) for loader in self.loaders)
        stage = self.stages[self.stage_index]
        self.say(Batches(f"stage {self.stage_index + 1}/{len(self.stages)} epoch {self.epoch + 1}/{stage.epochs}",
                         self.iter + 1 + (0 if self.training else train), train + valid))

    def after_epoch(self):
        import ray.train

        if self.epoch < self.start_epoch:  # fastai still calls after_epoch for the epochs a resume skips
            return
        stage, epoch = self.stages[self.stage_index], self.epoch + 1
        train_loss, valid_loss, acc = self.metrics.totals(self.device)
        row = {"stage": stage.name, "stage_index": self.stage_index + 1, "epoch": epoch,
               "global_epoch": len(self.progress.history) + 1, "train_loss": train_loss, "valid_loss": valid_loss,
               "accuracy": acc, "lr": float(self.learn.opt.hypers[-1]["lr"]), "seconds": round(time.time() - self.t0, 2)}
        if self.device.type == "cuda":  # the peak so far, and a fresh count for the next epoch
            row["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 3)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.progress.record(self.stages, self.stage_index, epoch, row, self.learn.model)
        metrics = {k: row[k] for k in ("stage_index", "epoch", "train_loss", "valid_loss", "accuracy")}
        if self.rank != 0:
            ray.train.report(metrics)
            return
        self.say(f"stage {self.stage_index + 1}/{len(self.stages)} ({stage.name}) epoch {epoch}/{stage.epochs}: "
                 f"train_loss {train_loss:.4f} valid_loss {valid_loss:.4f} accuracy {acc:.4f} ({row['seconds']} s)")
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(d, self.learn.model, self.learn.opt.state_dict(), self.progress.state(),
                            self.progress.best_weights)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def teller(lines):
    """How rank 0 tells its lines and `Batches`: onto the driver's queue (`training.WorkerLines`), else its lines
    printed into Ray's logs."""
    def say(line: str | Batches) -> None:
        if lines is not None:
            try:
                lines.put(line)
                return
            except Exception:  # noqa: BLE001  the driver's queue is gone: the line still reaches the worker's log
                pass
        if isinstance(line, str):
            print(line, flush=True)
    return say


def resume(model: nn.Module, rank: int, say=print) -> tuple[Progress, dict | None]:
    """The run's progress and optimizer state from Ray Train's latest checkpoint (weights into `model`)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return Progress(), None
    with checkpoint.as_directory() as d:
        weights, opt_state, state, best_weights = load_checkpoint(d)
    model.load_state_dict(weights)
    if rank == 0:
        say(f"resuming from checkpoint: stage {state['stage'] + 1}, {state['epoch']} epochs done in it")
    return Progress(**state, best_weights=best_weights), opt_state


def data_loaders(tc: TrainConfig, data: TrainingData, rank: int, world: int, device: torch.device):
    """fastai DataLoaders over this rank's equal shares of the train and valid streams."""
    import ray.train
    from fastai.data.core import DataLoaders

    common = dict(batch_size=tc.batch_size, prefetch_batches=tc.prefetch_batches, rank=rank)
    train = StreamLoader(ray.train.get_dataset_shard(TRAIN), data.train_windows // world,
                         shuffle_buffer=tc.shuffle_buffer, seed=tc.seed, **common)
    valid = StreamLoader(ray.train.get_dataset_shard(VALID), data.valid_windows // world, **common)
    return DataLoaders(train, valid, device=device)


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker: the stream, the model, the stages from where the run stands."""
    import ray.train
    import ray.train.torch as rtt

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc: TrainConfig = config["train_config"]
    data: TrainingData = config["data"]
    stages = tc.stages
    torch.manual_seed(tc.seed)
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    device = rtt.get_device()

    state_dict = ray.get(config["pretrained"]) if config.get("pretrained") is not None else None
    model = LangIdNet(tc.arch, len(data.labels), resnet_state=state_dict, input_shape=(data.n_mels, data.n_frames))
    del state_dict
    say = teller(config.get("lines"))
    progress, opt_state = resume(model, rank, say)
    model = model.to(device)
    if device.type == "cuda":  # tensor cores prefer NHWC
        model = model.to(memory_format=torch.channels_last)

    dls = data_loaders(tc, data, rank, world, device)
    metrics = EpochMetrics()
    # masking bands and frames is for spectrograms, not for an encoder's pooled embedding
    cbs = [metrics] + ([SpecAugment(tc.seed + rank)] if tc.spec_augment and tc.arch != "mlp" else [])
    workdir = tempfile.mkdtemp(prefix="langid-learner-")
    learn = make_learner(model, dls, workdir, cbs, mixed_precision=tc.mixed_precision)
    for i in range(progress.stage, len(stages)):
        stage = stages[i]
        start_epoch = progress.epoch if i == progress.stage else 0
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
        report = ReportEpoch(stages, i, start_epoch, progress, metrics, list(dls.loaders), rank, device, say)
        learn.fit_one_cycle(stage.epochs, lr_max=lrs, start_epoch=start_epoch, cbs=[report])
    shutil.rmtree(workdir, ignore_errors=True)
