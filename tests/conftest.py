"""Shared fixtures: a real local Ray, generated audio, and the optional ../shared clips."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

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
