"""The training job's driver: check the run, stream the store into Ray Train, export the model folder.

The pieces it puts together: settings (`config.TrainConfig`), the data stream (`trainset`), the worker loop
(`trainloop`), the checkpoint format (`checkpoint`), the fastai Learner (`learner`) and the export (`export`).
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import replace
from typing import Callable, Optional

from langid.config import Stage, TrainConfig, default_schedule  # noqa: F401  (the training API in one import)
from langid.errors import BadValue
from langid.store import Store, StoreError
from langid.trainset import TRAIN, VALID, TrainingData, training_data, window_dataset
from langid.uris import StagedFolder, absolute_uri

MIN_STREAM_BYTES = 256 * 2 ** 20  # object-store bytes the training streams may always hold
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
            raise BadValue(f"{output} holds a run with other settings ({', '.join(diff)}); rerun with the same "
                             "flags to resume it, or use a new --output")
        return
    write_atomic(fs, path, json.dumps(mine, indent=2).encode())


def check_trainable(tc: TrainConfig, data: TrainingData, frontend: str = "logmel") -> None:
    """Enough windows for every worker to train and validate on its share; AMP only where CUDA is; the mlp on
    encoder embeddings and a ResNet on spectrograms."""
    if (tc.arch == "mlp") != (frontend == "whisper-encoder"):
        raise BadValue(f"{tc.store} holds {frontend} features: train " +
                         ("--arch mlp on them" if frontend == "whisper-encoder" else "a ResNet on them (--arch mlp "
                          "needs a store preprocessed with --frontend whisper-encoder:MODEL)"))
    if tc.amp and not tc.gpu:
        raise BadValue("mixed precision (--amp) needs CUDA workers (--gpu)")
    if data.train_windows < 2 * tc.workers or data.valid_windows < tc.workers:
        raise StoreError(f"{tc.store}: {data.train_windows} training and {data.valid_windows} validation windows "
                         f"are too few for {tc.workers} worker(s)")


def training_datasets(tc: TrainConfig, data: TrainingData) -> dict:
    """The train stream (shards in a new seeded order each epoch) and the valid stream, for Ray Train to split."""
    return {TRAIN: window_dataset(tc.store, TRAIN, data, shuffle_seed=tc.seed),
            VALID: window_dataset(tc.store, VALID, data)}


def ingest_options(tc: TrainConfig, data: TrainingData):
    """Ray Data's options for the training streams: blocks kept in order (the same seed splits and shuffles the
    same way), and the blocks in flight bounded to twice what the workers' shuffle buffers and prefetched batches
    hold: unbounded, readers run ahead of a slow model until the object store is full (gigabytes at the Kaggle
    set's size) and take CPU from training."""
    import copy

    from ray.data import DataContext

    # a copy of the context's options, as Ray Train's default makes, without its deprecated `exclude_resources`
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    window = data.n_mels * data.n_frames * 2  # float16
    held = tc.workers * (tc.shuffle_buffer + (tc.prefetch_batches + 2) * tc.batch_size) * window
    options.resource_limits = options.resource_limits.copy(object_store_memory=max(2 * held, MIN_STREAM_BYTES))
    return options


class WorkerLines:
    """Rank 0's lines (each epoch, a resume) shown by the driver as they come, with a bar for the epoch under way,
    through a small queue actor: the workers' own output, which carries Ray Train's internal lines, stays in
    Ray's logs."""

    def __init__(self, show: Callable[[str], None]):
        from ray.util.queue import Queue

        self.print, self.queue = show, Queue(actor_options={"num_cpus": 0})
        self._bar = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self.queue

    def __exit__(self, *exc):
        import ray

        self._done.set()
        self._thread.join()
        try:
            for line in self.queue.get_nowait_batch(self.queue.qsize()):
                self.show(line)
        finally:
            ray.kill(self.queue.actor)
            self._close_bar()

    def show(self, line) -> None:
        """A line is printed (the bar of its epoch closes first); a `trainloop.Batches` moves the bar."""
        from langid.trainloop import Batches

        if not isinstance(line, Batches):
            self._close_bar()
            self.print(line)
            return
        if self._bar is None or self._bar.desc != line.epoch:
            from tqdm.auto import tqdm

            self._close_bar()
            self._bar = tqdm(desc=line.epoch, total=line.total, unit="batch", leave=False)
        self._bar.update(line.done - self._bar.n)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _pump(self) -> None:
        from ray.exceptions import RayError
        from ray.util.queue import Empty

        while not self._done.is_set():
            try:
                self.show(self.queue.get(timeout=0.5))
            except Empty:
                continue
            except RayError:  # the queue is gone: the job is ending
                return


def run_training(tc: TrainConfig, pretrained: bool = True, weights_file: Optional[str] = None, log=print,
                 progress: Optional[Callable[[str], None]] = print) -> dict:
    """Train with Ray Train (resuming a previous run in the same output), then export the model folder.

    `log` gets the driver's notes; `progress` the workers' epoch and resume lines (None: they stay in Ray's logs).
    """
    from langid.checkpoint import load_checkpoint
    from langid.export import export_model
    from langid.model import initial_weights

    tc = replace(tc, store=absolute_uri(tc.store), output=absolute_uri(tc.output))
    cfg = Store(tc.store).read_config()
    data = training_data(tc.store)
    check_trainable(tc, data, cfg.frontend)
    check_run_settings(tc.output, tc, data.labels)
    state, message = initial_weights(tc.arch, pretrained, weights_file)
    log(message)
    lines = WorkerLines(progress) if progress else contextlib.nullcontext()
    with lines as queue:
        checkpoint, seconds = _fit(tc, data, state, queue)
    with checkpoint.as_directory() as d:
        _, _, done, best = load_checkpoint(d)
    with StagedFolder(tc.output) as local:  # a URI output is written locally, then copied
        res = export_model(local, tc, cfg, data.labels, done, best, pretrained=state is not None, seconds=seconds)
    return {**res, "output": tc.output}


def _fit(tc: TrainConfig, data: TrainingData, state: Optional[dict], lines):
    """Ray Train's fit of the worker loop (rank 0 puts its lines on `lines`, a queue, when given); returns the
    last checkpoint and the seconds the fit took."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from langid.trainloop import train_loop_per_worker

    resources = {"CPU": tc.cpus_per_worker, **({"memory": tc.memory_per_worker} if tc.memory_per_worker else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train_config": tc, "data": data, "lines": lines,
                           "pretrained": ray.put(state) if state is not None else None},
        datasets=training_datasets(tc, data),
        dataset_config=ray.train.DataConfig(execution_options=ingest_options(tc, data)),
        scaling_config=ray.train.ScalingConfig(num_workers=tc.workers, use_gpu=tc.gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if tc.gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name="train", storage_path=f"{tc.output}/ray",
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    t0 = time.time()
    result = trainer.fit()
    if result.error:
        raise result.error
    return result.checkpoint, time.time() - t0


def run_lr_find(tc: TrainConfig, pretrained: bool = True, weights_file: Optional[str] = None) -> dict:
    """fastai's learning-rate finder in this process, streaming the train split; writes OUTPUT/lr_find.png."""
    import os

    from fastai.data.core import DataLoaders

    from langid.learner import lr_find
    from langid.model import build_model, default_device
    from langid.trainset import StreamLoader

    tc = replace(tc, store=absolute_uri(tc.store))
    data = training_data(tc.store)
    device = default_device(tc.gpu)
    check_trainable(tc, data, Store(tc.store).read_config().frontend)
    model = build_model(tc.arch, len(data.labels), pretrained, weights_file,
                        input_shape=(data.n_mels, data.n_frames)).to(device)
    train = StreamLoader(window_dataset(tc.store, TRAIN, data, shuffle_seed=tc.seed), data.train_windows,
                         tc.batch_size, shuffle_buffer=tc.shuffle_buffer, seed=tc.seed)
    valid = StreamLoader(window_dataset(tc.store, VALID, data), data.valid_windows, tc.batch_size)
    plot = os.path.join(tc.output, "lr_find.png")
    return {"valley": lr_find(model, DataLoaders(train, valid, device=device), plot), "plot": plot}
