"""Training data as streams: Ray Data over a store's window shards, and the loader fastai's Learner iterates.

No process holds a split. Ray Data reads the Parquet shards (in a new seeded order each epoch for training),
turns each block into float16 arrays, and Ray Train splits the stream equally across the workers
(`streaming_split(equal=True)`: every rank gets the same number of windows, so the same number of batches).
Each worker keeps a bounded shuffle buffer and a few prefetched batches: memory does not grow with the store.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from langid.store import WINDOWS, Store, StoreError, logmel_matrix

TRAIN, VALID = "train", "valid"
SHARDS_PER_TASK = 8
STEP_PAUSE_S = 0.05


@dataclass(frozen=True)
class TrainingData:
    """What the driver knows of a store before training: classes, window counts, spectrogram shape."""

    labels: list
    train_windows: int
    valid_windows: int
    n_mels: int
    n_frames: int


def training_data(store_uri: str) -> TrainingData:
    """Classes (the train split's languages) and counts, read from two small columns; checked to be trainable."""
    store = Store(store_uri)
    cfg = store.read_config()
    table = store.read(WINDOWS, columns=["language", "split"])
    counts = table.group_by(["split", "language"]).aggregate([([], "count_all")])
    per = {(s, lang): n for s, lang, n in zip(*(counts.column(c).to_pylist() for c in ("split", "language", "count_all")))}
    labels = sorted(lang for s, lang in per if s == TRAIN)
    if len(labels) < 2:
        raise StoreError(f"{store_uri}: training needs at least two languages in the train split, found {labels}")
    valid = sum(per.get((VALID, lang), 0) for lang in labels)
    if valid == 0:
        raise StoreError(f"{store_uri}: no validation windows of the training languages; "
                         "preprocess with --valid-fraction > 0")
    return TrainingData(labels, sum(per[(TRAIN, lang)] for lang in labels), valid, *cfg.shape)


def _split_filter(split: str, labels: list):
    return (pc.field("split") == split) & pc.field("language").isin(labels)


def read_windows(store_uri: str, shard: str, split: str, labels: list, batch_size: int = 256) -> Iterator[pa.Table]:
    """One shard's windows of a split (language, n_mels, n_frames, logmel), in tables of at most `batch_size`;
    the filter is pushed into the Parquet reader, so other splits' spectrograms are not decoded."""
    import pyarrow.dataset as ds

    dataset = ds.dataset([shard], filesystem=Store(store_uri).fs, format="parquet")
    for batch in dataset.to_batches(columns=["language", "n_mels", "n_frames", "logmel"],
                                    filter=_split_filter(split, labels), batch_size=batch_size):
        if batch.num_rows:
            yield pa.Table.from_batches([batch])


def class_indices(table: pa.Table, labels: list) -> np.ndarray:
    """Each row's language as its index in `labels` (int64)."""
    return pc.index_in(table.column("language"), pa.array(labels)).to_numpy(zero_copy_only=False).astype(np.int64)


def to_examples(table: pa.Table, labels: list) -> dict:
    """Store rows as model input: x float16 (n, n_mels, n_frames) (half the bytes of the store's float32; the
    values are in [0, 1]), y int64 class indices."""
    return {"x": logmel_matrix(table).astype(np.float16), "y": class_indices(table, labels)}


def _read_shards(batch: dict, store_uri: str, split: str, labels: list) -> Iterator[dict]:
    for shard in batch["shard"]:
        for table in read_windows(store_uri, str(shard), split, labels):
            yield to_examples(table, labels)


def paced_scheduling():
    """A Ray Data execution callback that pauses its scheduler STEP_PAUSE_S per step.

    Ray Data 2.60's scheduling loop polls without pause while its output waits for a slower consumer, which is
    every CPU training run on a store larger than the read-ahead: it took a whole core from training here (half
    the clips/s at 20,000 windows). Blocks are a shard each, far fewer than steps, so the pause costs nothing.
    """
    import time

    from ray.data._internal.execution.execution_callback import ExecutionCallback

    class PacedScheduling(ExecutionCallback):
        def on_execution_step(self, executor):
            time.sleep(STEP_PAUSE_S)

    return PacedScheduling


def window_dataset(store_uri: str, split: str, data: TrainingData, shuffle_seed: Optional[int] = None,
                   readers: int = 2):
    """A Ray Dataset of one split's windows as {x, y}, a block per shard, SHARDS_PER_TASK shards per read task; with
    a seed, the shards come in a new order each execution (each epoch), the same orders on every run."""
    import ray.data
    from ray.data import RandomSeedConfig

    shards = Store(store_uri).shards(WINDOWS)
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=max(1, len(shards)))
    ds.context.custom_execution_callback_classes.append(paced_scheduling())
    if shuffle_seed is not None:
        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True))
    # Reading is light next to training, and the training workers may hold every CPU of a node (the demo's one
    # worker takes both here): read tasks that asked for a CPU would wait forever, so they ask for none. Without
    # a CPU to bound them they would be as many as the shards, and every epoch would start that many processes
    # (Ray ends idle ones beyond a node's CPUs): a few readers keep up with the model and start in a second.
    # Several shards per task: fewer tasks to schedule; the scheduler's busy polling is what `paced_scheduling`
    # stops, not this.
    return ds.map_batches(_read_shards, batch_size=SHARDS_PER_TASK, num_cpus=0,
                          compute=ray.data.TaskPoolStrategy(size=readers),
                          fn_kwargs={"store_uri": store_uri, "split": split, "labels": list(data.labels)})


def iter_split(store_uri: str, split: str, labels: list, batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x float32 (n, n_mels, n_frames), y int64) batches of one split, read shard by shard in this process."""
    for shard in Store(store_uri).shards(WINDOWS):
        for table in read_windows(store_uri, shard, split, labels, batch_size):
            yield np.array(logmel_matrix(table)), class_indices(table, labels)  # writable, for torch.from_numpy


class StreamLoader:
    """The batches of a Ray Data stream (a worker's shard, or a whole dataset) as fastai's Learner iterates them.

    `windows` is how many rows the stream yields per epoch, so the length is known before the epoch (fastai's
    schedules need it). A last batch of one window joins the one before it: BatchNorm cannot train on one.
    """

    n_inp = 1

    def __init__(self, source, windows: int, batch_size: int, shuffle_buffer: int = 0, seed: int = 0,
                 prefetch_batches: int = 2, rank: int = 0):
        self.source, self.n, self.bs = source, windows, batch_size
        self.shuffle_buffer, self.seed, self.prefetch_batches, self.rank = shuffle_buffer, seed, prefetch_batches, rank
        self.epoch, self.device = 0, None

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.bs)
        return full + (rest > 1 or (rest == 1 and full == 0))

    def set_epoch(self, epoch: int) -> None:
        """A new shuffle order per epoch (like torch's DistributedSampler.set_epoch), repeatable across runs."""
        self.epoch = epoch

    def to(self, device):
        self.device = device
        return self

    def _batches(self):
        import torch

        cuda = self.device is not None and torch.device(self.device).type == "cuda"
        shuffle = {}
        if self.shuffle_buffer:
            seed = int(np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1)[0])
            shuffle = {"local_shuffle_buffer_size": max(self.shuffle_buffer, self.bs), "local_shuffle_seed": seed}
        # float16 travels to the device (half the bytes) and becomes float32 there
        return self.source.iter_torch_batches(batch_size=self.bs, prefetch_batches=self.prefetch_batches,
                                              device=self.device or "cpu", pin_memory=cuda, drop_last=False,
                                              **shuffle)

    def __iter__(self):
        import torch

        full, rest = divmod(self.n, self.bs)
        held = None
        for i, b in enumerate(self._batches()):
            x, y = b["x"].float().unsqueeze(1), b["y"]
            if x.is_cuda:  # the model is channels-last on CUDA (tensor cores prefer NHWC)
                x = x.contiguous(memory_format=torch.channels_last)
            if held is not None:
                x, y = torch.cat([held[0], x]), torch.cat([held[1], y])
                held = None
            elif rest == 1 and full > 0 and i == full - 1:
                held = (x, y)
                continue
            yield x, y
        if held is not None:
            yield held
