"""The training job's driver: check the run, stream the store into Ray Train, export the model folder.

The pieces it puts together: settings (`config.TrainConfig`), the data stream (`trainset`), the worker loop
(`trainloop`), the checkpoint format (`checkpoint`), the fastai Learner (`learner`) and the export (`export`).
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Optional

from langid.config import Stage, TrainConfig, default_schedule  # noqa: F401  (the training API in one import)
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
            raise ValueError(f"{output} holds a run with other settings ({', '.join(diff)}); rerun with the same "
                             "flags to resume it, or use a new --output")
        return
    write_atomic(fs, path, json.dumps(mine, indent=2).encode())


def check_trainable(tc: TrainConfig, data: TrainingData, frontend: str = "logmel") -> None:
    """Enough windows for every worker to train and validate on its share; AMP only where CUDA is; the mlp on
    encoder embeddings and a ResNet on spectrograms."""
    if (tc.arch == "mlp") != (frontend == "whisper-encoder"):
        raise ValueError(f"{tc.store} holds {frontend} features: train " +
                         ("--arch mlp on them" if frontend == "whisper-encoder" else "a ResNet on them (--arch mlp "
                          "needs a store preprocessed with --frontend whisper-encoder:MODEL)"))
    if tc.amp and not tc.gpu:
        raise ValueError("mixed precision (--amp) needs CUDA workers (--gpu)")
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


def run_training(tc: TrainConfig, pretrained: bool = True, weights_file: Optional[str] = None, log=print) -> dict:
    """Train with Ray Train (resuming a previous run in the same output), then export the model folder."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from langid.checkpoint import load_checkpoint
    from langid.export import export_model
    from langid.model import imagenet_weights
    from langid.trainloop import train_loop_per_worker

    tc = replace(tc, store=absolute_uri(tc.store), output=absolute_uri(tc.output))
    cfg = Store(tc.store).read_config()
    data = training_data(tc.store)
    check_trainable(tc, data, cfg.frontend)
    check_run_settings(tc.output, tc, data.labels)
    state = None
    if tc.arch == "mlp":
        log("mlp on the store's front-end embeddings")
    elif pretrained:
        state, message = imagenet_weights(tc.arch, weights_file)
        log(message)
    else:
        log("random initialisation (--no-pretrained)")
    resources = {"CPU": tc.cpus_per_worker, **({"memory": tc.memory_per_worker} if tc.memory_per_worker else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train_config": tc, "data": data,
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
    with result.checkpoint.as_directory() as d:
        _, _, progress, best = load_checkpoint(d)
    with StagedFolder(tc.output) as local:  # a URI output is written locally, then copied
        res = export_model(local, tc, cfg, data.labels, progress, best, pretrained=state is not None,
                           seconds=time.time() - t0)
    return {**res, "output": tc.output}


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
