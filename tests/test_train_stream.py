"""The training stream on a real local Ray: Ray Data over the store's shards, split by Ray Train across workers.

The stores are generated spectrograms written through the store's own writer (tests/support/generated_store.py);
each window is recognised by its bytes, so the tests can say which rank saw which window in which epoch.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from langid.config import FeatureConfig, TrainConfig
from langid.store import Store, StoreError
from langid.training import MIN_STREAM_BYTES
from support.generated_store import split_digests, write_store

SMALL = FeatureConfig(window_seconds=0.5, n_mels=16, hop_length=160)  # 16 x 51 windows: fast to write and read


def memory_status() -> dict:
    """This process's resident bytes by kind (Linux /proc): private (RssAnon) and shared memory (RssShmem)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssShmem:")):
                key, kb = line.split()[:2]
                out[key[:-1]] = int(kb) * 1024
    return out


def _stream_loop(config: dict) -> None:
    """A Ray Train worker that only iterates its share of the train stream, as the training loop does, and writes
    what it saw: per epoch the batch sizes, the loader's announced length and every window's digest; its peak RSS."""
    import threading

    import ray.train

    from langid.trainset import TRAIN, StreamLoader
    from support.generated_store import window_digest

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    loader = StreamLoader(ray.train.get_dataset_shard(TRAIN), config["windows"] // world, config["batch_size"],
                          shuffle_buffer=config["shuffle_buffer"], seed=config["seed"], rank=rank)
    peaks, done = {}, threading.Event()

    def sample():  # private and shared (object store) resident bytes, every 10 ms
        while not done.is_set():
            for k, v in memory_status().items():
                peaks[k] = max(peaks.get(k, 0), v)
            done.wait(0.01)

    before = memory_status()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    epochs = []
    for epoch in range(config["epochs"]):
        loader.set_epoch(epoch)
        sizes, digests = [], []
        for x, y in loader:
            assert x.dtype.is_floating_point and tuple(x.shape[1:2]) == (1,)
            sizes.append(len(y))
            digests += [window_digest(w[0].numpy()) for w in x]
        epochs.append({"len": len(loader), "sizes": sizes, "digests": digests})
    done.set()
    sampler.join()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"epochs": epochs, "before": before, "peak": peaks}))
    ray.train.report({"rank": rank})


def run_stream(tmp: Path, store_uri: str, workers: int, epochs: int = 2, batch_size: int = 8, seed: int = 0,
               shuffle_buffer: int = 32) -> list[dict]:
    """The real ingest (`training_datasets`, ordered, split equally by Ray Train) under `_stream_loop`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from langid.trainset import training_data
    from langid.training import ingest_options, training_datasets

    data = training_data(store_uri)
    out = tmp / f"seen-{workers}-{seed}-{len(list(tmp.iterdir()))}"
    out.mkdir()
    tc = TrainConfig(store=store_uri, output=str(out), seed=seed, shuffle_buffer=shuffle_buffer, workers=workers,
                     batch_size=batch_size)
    trainer = TorchTrainer(
        _stream_loop,
        train_loop_config={"windows": data.train_windows, "batch_size": batch_size, "epochs": epochs, "seed": seed,
                           "shuffle_buffer": shuffle_buffer, "out": str(out)},
        datasets=training_datasets(tc, data),
        dataset_config=ray.train.DataConfig(execution_options=ingest_options(tc, data)),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="stream", storage_path=str(tmp / "ray"),
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    result = trainer.fit()
    assert result.error is None, result.error
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(workers)]


@pytest.mark.slow
def test_every_training_window_once_per_epoch_on_exactly_one_rank(ray_local, tmp_path):
    store = write_store(str(tmp_path / "store"), train=96, valid=8, cfg=SMALL, shard_windows=7)
    everything = split_digests(store, "train")
    assert len(set(everything)) == 96

    ranks = run_stream(tmp_path, str(tmp_path / "store"), workers=2, epochs=2)
    orders = []
    for epoch in range(2):
        seen = [r["epochs"][epoch]["digests"] for r in ranks]
        assert [len(s) for s in seen] == [48, 48]
        assert not set(seen[0]) & set(seen[1])  # on exactly one rank
        assert sorted(seen[0] + seen[1]) == sorted(everything)  # every window, once
        assert [r["epochs"][epoch]["sizes"] for r in ranks] == [[8] * 6] * 2
        orders.append(seen)
    assert orders[0] != orders[1]  # a new order each epoch, the same on a rerun
    again = run_stream(tmp_path, str(tmp_path / "store"), workers=2, epochs=2)
    assert [[e["digests"] for e in r["epochs"]] for r in again] == [[e["digests"] for e in r["epochs"]] for r in ranks]


@pytest.mark.slow
def test_equal_batch_counts_on_every_rank_with_an_uneven_number_of_windows(ray_local, tmp_path):
    # 101 windows over 2 ranks: Ray's equal split gives each rank 50 (one window sits out, a different one as the
    # order changes); 50 = 6 x 8 + 2, so 7 batches each; and 49 windows per rank would end in a batch of one,
    # which joins the batch before it (BatchNorm cannot train on one window)
    store = write_store(str(tmp_path / "store"), train=101, valid=8, cfg=SMALL, shard_windows=9)
    everything = set(split_digests(store, "train"))
    ranks = run_stream(tmp_path, str(tmp_path / "store"), workers=2, epochs=2)
    for epoch in range(2):
        per_rank = [r["epochs"][epoch] for r in ranks]
        assert [len(e["sizes"]) for e in per_rank] == [e["len"] for e in per_rank] == [7, 7]
        assert [sum(e["sizes"]) for e in per_rank] == [50, 50]
        seen = per_rank[0]["digests"] + per_rank[1]["digests"]
        assert len(set(seen)) == len(seen) == 100 and set(seen) <= everything

    write_store(str(tmp_path / "odd"), train=99, valid=8, cfg=SMALL, shard_windows=9)
    ranks = run_stream(tmp_path, str(tmp_path / "odd"), workers=2, epochs=1)
    assert [r["epochs"][0]["sizes"] for r in ranks] == [[8] * 5 + [9]] * 2  # 49 = 5 x 8 + 9, no batch of one
    assert [r["epochs"][0]["len"] for r in ranks] == [6, 6]


@pytest.mark.slow
def test_a_workers_memory_does_not_grow_with_the_store(ray_local, tmp_path):
    """Bytes a worker holds while streaming an epoch of 10-s windows: 200 windows against 1,000 (5x, 205 MB more
    spectrogram data). Private memory stays flat; the shared pages it maps are the object store's blocks in
    flight, bounded by the read-ahead limit (here its floor, MIN_STREAM_BYTES), not by the store."""
    cfg = FeatureConfig()  # 10-s windows, 64 x 1001 float32: 256 KB each
    window_bytes = cfg.n_mels * cfg.window_frames * 4
    growth = {}
    for n in (200, 1000):
        write_store(str(tmp_path / f"s{n}"), train=n, valid=4, cfg=cfg, shard_windows=32)
        (rank,) = run_stream(tmp_path, str(tmp_path / f"s{n}"), workers=1, epochs=1, batch_size=16, shuffle_buffer=32)
        assert sum(rank["epochs"][0]["sizes"]) == n
        growth[n] = {k: rank["peak"][k] - rank["before"][k] for k in rank["peak"]}
    more_data = (1000 - 200) * window_bytes
    private = growth[1000]["RssAnon"] - growth[200]["RssAnon"]
    # measured: private +0.3 MB; the shared pages grow only until the blocks in flight reach the read-ahead bound
    # (the old loader held the split as float32 plus a float16 copy: 1.5x the data, in private memory)
    assert private < 0.1 * more_data, (growth, more_data)
    assert growth[1000]["RssShmem"] <= MIN_STREAM_BYTES + 32 * 2 ** 20, growth


def test_training_data_counts_and_refusals(tmp_path):
    from langid.training import check_trainable
    from langid.trainset import training_data

    write_store(str(tmp_path / "s"), train=10, valid=3, cfg=SMALL)
    data = training_data(str(tmp_path / "s"))
    assert (data.labels, data.train_windows, data.valid_windows) == (["de", "en", "es"], 10, 3)
    assert (data.n_mels, data.n_frames) == (SMALL.n_mels, SMALL.window_frames)
    tc = TrainConfig(store=str(tmp_path / "s"), output=str(tmp_path / "m"), workers=4)
    with pytest.raises(StoreError, match="too few for 4 worker"):
        check_trainable(tc, data)
    with pytest.raises(ValueError, match="needs CUDA"):
        check_trainable(TrainConfig(store="s", output="m", amp=True), data)
    assert TrainConfig(store="s", output="m", gpu=True).mixed_precision
    assert not TrainConfig(store="s", output="m").mixed_precision

    write_store(str(tmp_path / "novalid"), train=10, valid=0, cfg=SMALL)
    with pytest.raises(StoreError, match="no validation windows"):
        training_data(str(tmp_path / "novalid"))


def test_iter_split_reads_a_split_shard_by_shard(tmp_path):
    from langid.store import WINDOWS, logmel_matrix
    from langid.trainset import iter_split

    store = write_store(str(tmp_path / "s"), train=20, valid=7, cfg=SMALL, shard_windows=6)
    batches = list(iter_split(str(tmp_path / "s"), "valid", ["de", "en", "es"], batch_size=4))
    assert all(len(x) <= 4 for x, _ in batches)
    x = np.concatenate([x for x, _ in batches])
    y = np.concatenate([y for _, y in batches])
    import pyarrow.compute as pc

    table = Store(store.uri).read(WINDOWS, filters=pc.field("split") == "valid")
    np.testing.assert_array_equal(x, logmel_matrix(table))
    assert [["de", "en", "es"][i] for i in y] == table.column("language").to_pylist()
    assert x.flags.writeable and x.dtype == np.float32
