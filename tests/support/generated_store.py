"""Stores of generated spectrograms at any size, written through the store's own writer (no audio, no Ray).

Shaped like a preprocessed Kaggle store: one window per 10-s clip, languages in turn, a share of the
recordings in validation, shards of a preprocessing task's size. Every window's values are distinct random
numbers in [0, 1), so a window can be recognised by its bytes.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from langid.config import FeatureConfig
from langid.store import WINDOWS, Store, logmel_matrix

LANGUAGES = ("de", "en", "es")


def write_store(uri: str, train: int, valid: int, cfg: FeatureConfig = FeatureConfig(), shard_windows: int = 64,
                seed: int = 0, progress=None) -> Store:
    """A store with `train` + `valid` windows; `progress(n)` is called with the windows written so far."""
    store = Store(uri)
    store.init(cfg)
    rng = np.random.default_rng(seed)
    splits = ["train"] * train + ["valid"] * valid
    for start in range(0, len(splits), shard_windows):
        rows = range(start, min(start + shard_windows, len(splits)))
        n = len(rows)
        langs = [LANGUAGES[i % len(LANGUAGES)] for i in rows]
        values = rng.random((n, cfg.n_mels * cfg.window_frames), dtype=np.float32)
        offsets = np.arange(n + 1, dtype=np.int32) * values.shape[1]
        table = pa.table({
            "path": [f"generated/{lang}_m_{i:032x}.fragment0.flac" for lang, i in zip(langs, rows)],
            "language": langs,
            "split": [splits[i] for i in rows],
            "recording_id": [f"{i:032x}" for i in rows],
            "speaker": [""] * n,
            "gender": ["m"] * n,
            "fragment": [0] * n,
            "augmentation": [""] * n,
            "augmentation_index": [0] * n,
            "window_index": [0] * n,
            "window_start": [0.0] * n,
            "duration": [cfg.window_seconds] * n,
            "source_sample_rate": [cfg.sample_rate] * n,
            "source_channels": [1] * n,
            "quality_flags": [""] * n,
            "n_mels": [cfg.n_mels] * n,
            "n_frames": [cfg.window_frames] * n,
            "logmel": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.ravel())),
        })
        store.write_shard(WINDOWS, table, f"gen-{start:09d}")
        if progress:
            progress(rows[-1] + 1)
    return store


def window_digest(x: np.ndarray) -> str:
    """A window recognised by its values as the training stream carries them (float16)."""
    return hashlib.sha1(np.ascontiguousarray(x, dtype=np.float16).tobytes()).hexdigest()


def split_digests(store: Store, split: str) -> list[str]:
    """The digests of every window of a split, read from the store."""
    import pyarrow.compute as pc

    table = store.read(WINDOWS, columns=["logmel", "n_mels", "n_frames"], filters=pc.field("split") == split)
    return [window_digest(x) for x in logmel_matrix(table)]
