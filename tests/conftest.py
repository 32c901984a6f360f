"""Shared fixtures: a real local Ray, generated audio, a small trained model, and the optional ../shared clips."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from langid.config import FeatureConfig

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
REALSPEECH = SHARED / "realspeech"
NOISE = SHARED / "noise"


def needs_shared(path: Path = REALSPEECH):
    """Skip (with the reason) where ../shared is absent, as in a user's fresh clone."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present (only CI and developers have ../shared)")


@pytest.fixture(scope="session")
def ray_local():
    """One real embedded Ray for the whole session (2 CPUs, like this machine)."""
    import ray

    from langid.runtime import init_ray, quiet_ray_data

    os.environ.pop("RAY_ADDRESS", None)
    # workers import what tests hand them (worker loops defined in test modules, tests/support)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    init_ray(num_cpus=2)
    quiet_ray_data()
    yield ray
    ray.shutdown()


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.3, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A sine with a little noise, (frames,) or (frames, channels)."""
    t = np.arange(int(seconds * rate)) / rate
    x = amplitude * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    x = x.astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def write_wav(path: Path, samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples, rate, subtype=subtype)
    return path


@pytest.fixture
def kaggle_tree(tmp_path):
    """A tiny Kaggle-layout corpus of tones (two 'languages', three recordings each) plus broken files."""
    root = tmp_path / "kaggle"
    freqs = {"en": 300.0, "de": 900.0}
    for lang, f in freqs.items():
        for r in range(3):
            rec = f"{lang}{r}".encode().hex().ljust(32, "0")[:32]
            for frag in range(2):
                write_wav(root / "train" / "train" / f"{lang}_m_{rec}.fragment{frag}.flac",
                          tone(f + 10 * r, 3.0, 22050, seed=frag), 22050)
            write_wav(root / "train" / "train" / f"{lang}_m_{rec}.fragment0.speed1.flac", tone(f * 1.1, 3.0, 22050), 22050)
        rec = f"{lang}test".encode().hex().ljust(32, "0")[:32]
        write_wav(root / "test" / "test" / f"{lang}_f_{rec}.fragment0.flac", tone(f, 3.0, 22050), 22050)
    broken = root / "train" / "train"
    (broken / "en_f_" f"{'ab' * 16}.fragment0.flac").write_bytes(b"")  # empty
    (broken / "de_f_" f"{'cd' * 16}.fragment0.flac").write_bytes(b"this is not audio at all\n" * 20)
    good = (root / "train" / "train").glob("en_m_*.fragment0.flac")
    data = next(iter(sorted(good))).read_bytes()
    (broken / "es_m_" f"{'ef' * 16}.fragment0.flac").write_bytes(data[: len(data) // 8])  # truncated
    (broken / "badname.flac").write_bytes(data)  # decodes, but its name says nothing
    return root


# ---------------------------------------------------------------- a small model that tells two tones apart
# "en" is a low tone (~300 Hz), "de" a high one (~2500 Hz): a model that separates them answers with certainty,
# so the labeling tests can check rows, languages, segments and confidences exactly.

TONE_CFG = FeatureConfig(sample_rate=16000, window_seconds=1.0, n_mels=32, hop_length=160, fmax=8000)
FREQ = {"en": 300.0, "de": 2500.0}


def voice(lang: str, seconds: float, seed: int = 0) -> np.ndarray:
    """A tone of the language's band, its pitch varied a little by the seed, with some noise."""
    return tone(FREQ[lang] * (1 + 0.03 * (seed % 5 - 2)), seconds, TONE_CFG.sample_rate, seed=seed)


def kaggle_name(lang: str, i: int, frag: int = 0) -> str:
    return f"{lang}_{'mf'[i % 2]}_{hashlib.md5(f'{lang}{i}'.encode()).hexdigest()}.fragment{frag}.flac"


def _train_head(Xt, yt, labels):
    """A resnet18 LangIdNet: random (fixed) body, head trained on its features. Seconds on a busy CPU.

    The same rows in the same order give the same weights: every generator seeded, deterministic kernels (one
    thread: the caller's torch.set_num_threads(1)). The order matters (dropout masks fall on row positions)."""
    import random

    import torch

    from langid.model import INPUT_MEAN, INPUT_STD, LangIdNet

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        model = LangIdNet("resnet18", len(labels)).eval()
        with torch.no_grad():
            feats = model.body((torch.from_numpy(Xt.astype(np.float32))[:, None] - INPUT_MEAN) / INPUT_STD)
        y = torch.from_numpy(yt)
        opt = torch.optim.Adam(model.head.parameters(), lr=1e-3)
        model.head.train()
        for _ in range(80):
            loss = torch.nn.functional.cross_entropy(model.head(feats), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return model.eval()


def _split_arrays(store_dir: Path, split: str, labels: list[str]):
    """(X (n, n_mels, frames) float32, y) of one split of a store, in a fixed order: (file name, window).

    Read here, not through langid's training code: the store's row order follows its shard names, hashes of
    this session's temporary paths, and the order of the rows changes the trained model (dropout masks)."""
    import pyarrow.compute as pc

    from langid.store import WINDOWS, Store, logmel_matrix

    table = Store(str(store_dir)).read(WINDOWS, filters=pc.field("split") == split)
    key = list(zip(map(os.path.basename, table.column("path").to_pylist()), table.column("window_index").to_pylist()))
    table = table.take(sorted(range(len(key)), key=key.__getitem__))
    y = np.array([labels.index(lang) for lang in table.column("language").to_pylist()], dtype=np.int64)
    return logmel_matrix(table).copy(), y  # writable: torch.from_numpy warns of a read-only array


@pytest.fixture(scope="session")
def model_dir(ray_local, tmp_path_factory):
    """Kaggle-named tone corpus -> run_preprocess -> store windows -> trained resnet18 -> save_model; read-only."""
    import torch

    import langid
    from langid.artifact import save_model
    from langid.preprocess import run_preprocess

    torch.set_num_threads(1)
    rate = TONE_CFG.sample_rate
    base = tmp_path_factory.mktemp("model")
    corpus = base / "corpus"
    rng = np.random.default_rng(0)
    for lang, f0 in FREQ.items():
        for r in range(4):
            for frag in range(2):  # the second fragments end in a padded window (half to nine tenths full)
                seconds = 3.0 if frag == 0 else 2.5 + 0.13 * r
                x = tone(f0 * rng.uniform(0.85, 1.15), seconds, rate, seed=10 * r + frag)
                x = x + (rng.uniform(0.005, 0.05) * rng.standard_normal(len(x))).astype(np.float32)
                write_wav(corpus / "train" / "train" / kaggle_name(lang, 100 + r, frag), x, rate)
        write_wav(corpus / "test" / "test" / kaggle_name(lang, 200), tone(f0, 3.0, rate, seed=7), rate)
    res = run_preprocess(str(corpus), str(base / "store"), cfg=TONE_CFG, batch_size=8, progress=False)
    assert (res.ok, res.failed) == (18, 0), res.summary()
    labels = sorted(FREQ)
    Xt, yt = _split_arrays(base / "store", "train", labels)
    Xv, yv = _split_arrays(base / "store", "valid", labels)
    assert set(yt) == {0, 1} and len(yv) > 0
    model = _train_head(Xt, yt, labels)
    with torch.no_grad():
        assert (model(torch.from_numpy(Xv)[:, None]).argmax(1).numpy() == yv).all()
    folder = base / "model"
    save_model(model, str(folder), labels, TONE_CFG, extra={})

    # the saved model answers every tone of both bands, confidently, before any test relies on it: the tests'
    # lengths, so whole windows and padded tails (1.5 and 2.5 s end in a half-full window); every window right
    ident = langid.load_model(str(folder), "cpu")
    sigs = [(lang, voice(lang, sec, seed)) for lang in FREQ for sec in (1.5, 2.0, 2.5, 3.0) for seed in range(10)]
    preds = ident.predict_many([x for _, x in sigs], sample_rate=rate)
    assert [p.language for p in preds] == [lang for lang, _ in sigs]
    assert all(s.language == lang for p, (lang, _) in zip(preds, sigs) for s in p.segments)
    assert min(p.confidence for p in preds) > 0.99, sorted(p.confidence for p in preds)[:3]
    return folder
