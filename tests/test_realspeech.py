"""Every real clip in ../shared/data/realspeech decodes to what its manifest says."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import soundfile as sf

from conftest import REALSPEECH, needs_shared
from langid.audio import dbfs, load_audio
from langid.config import FeatureConfig
from langid.features import log_mel, windows

pytestmark = needs_shared()

MANIFEST = REALSPEECH / "manifest.tsv"


def _rows() -> list[dict]:
    if not MANIFEST.exists():
        return []
    with open(MANIFEST, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


ROWS = _rows()


def _ext(row) -> str:
    return os.path.splitext(row["file"])[1].lower()


# What a clip is, from its manifest row. Each kind the decoder must handle gets a named test below.
KINDS = {
    "opus": lambda r: r["format"].upper() == "OPUS" or _ext(r) == ".opus",
    "mp3": lambda r: _ext(r) == ".mp3" or r["format"].upper().startswith("MPEG"),
    "wav_24bit": lambda r: _ext(r) == ".wav" and r["format"] == "PCM_24",
    "rate_48k": lambda r: int(r["sample_rate"]) == 48000,
    "stereo": lambda r: int(r["channels"]) >= 2,
    "rate_44k1": lambda r: int(r["sample_rate"]) == 44100,
    "rate_16k": lambda r: int(r["sample_rate"]) == 16000,
    "flac": lambda r: _ext(r) == ".flac",
    "aiff": lambda r: _ext(r) in (".aif", ".aiff"),
    "pcm_24bit_any_container": lambda r: r["format"] == "PCM_24",
}
# shared/data/README.md promises these, but manifest.tsv (129 clips, all mono PCM WAV/AIFF/FLAC) has none of them.
# Strict: once such clips are added, these turn into failures and the marks must go.
MISSING_IN_SHARED = {"opus", "mp3", "wav_24bit", "stereo"}


def _check(row, audio):
    assert audio.sample_rate == 16000
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.source_sample_rate == int(row["sample_rate"])
    assert audio.source_channels == int(row["channels"])
    assert abs(audio.duration - float(row["duration_s"])) <= 0.05
    assert abs(len(audio.samples) - audio.duration * 16000) <= 1
    assert np.all(np.isfinite(audio.samples))
    assert float(np.max(np.abs(audio.samples))) <= 1.0
    # normalised to -20 dBFS RMS, or below it where the peak limit scaled a spiky clip down
    assert -40.0 < dbfs(audio.samples) <= -19.9


@pytest.mark.parametrize("row", ROWS, ids=[r["file"] for r in ROWS])
def test_clip_decodes_as_manifest_says(row):
    audio = load_audio(str(REALSPEECH / row["file"]))
    _check(row, audio)


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_format_kind_is_covered(kind):
    rows = [r for r in ROWS if KINDS[kind](r)]
    if not rows:
        assert kind in MISSING_IN_SHARED, f"no {kind} clip in {MANIFEST}: this kind would go untested"
        pytest.skip(f"no {kind} clip in the shared manifest; test_real_clip_transcoded decodes this kind")
    for row in rows:
        _check(row, load_audio(str(REALSPEECH / row["file"])))


def test_features_of_one_clip_per_kind():
    """The preprocessing path (windows, log-mel) on real clips: right shapes, finite, in range, not silent.

    One clip per (container, sample rate, bit depth) and the longest clip, to keep the suite fast.
    """
    cfg = FeatureConfig()
    chosen = {}
    for row in ROWS:
        chosen.setdefault((_ext(row), row["sample_rate"], row["format"], row["channels"]), row)
    longest = max(ROWS, key=lambda r: float(r["duration_s"]))
    picked = list(chosen.values()) + [longest]
    n = 0
    for row in picked:
        audio = load_audio(str(REALSPEECH / row["file"]))
        wins = list(windows(audio.samples, cfg))
        assert len(wins) == max(1, int(audio.duration // cfg.window_seconds)
                                + (audio.duration % cfg.window_seconds >= cfg.window_seconds / 2))
        for _, chunk, flags in wins:
            spec = log_mel(chunk, cfg)
            assert spec.shape == (cfg.n_mels, cfg.window_frames)
            assert np.all(np.isfinite(spec)) and spec.min() >= 0.0 and spec.max() <= 1.0
            assert "silent" not in flags, row["file"]
            n += 1
    assert n >= len(picked) + 5  # the longest clip (a minute) alone gives six windows


# --- the kinds the shared clips lack, made from a real clip -------------------------------------

def _source_row():
    """A real 48 kHz sentence (the codecs below support 48 kHz), else any clip."""
    for r in ROWS:
        if int(r["sample_rate"]) == 48000 and r["kind"] == "sentence" and float(r["duration_s"]) > 3:
            return r
    return ROWS[0]


def _best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 1600) -> float:
    """Largest normalised correlation of two signals over lags up to `max_lag` samples (codec delay)."""
    n = min(len(a), len(b)) - max_lag
    a0 = a[max_lag:max_lag + n]
    best = 0.0
    for lag in range(-max_lag, max_lag + 1, 1):
        b0 = b[max_lag + lag:max_lag + lag + n]
        c = float(np.dot(a0, b0) / (np.linalg.norm(a0) * np.linalg.norm(b0) + 1e-12))
        best = max(best, c)
        if best > 0.99:
            break
    return best


@pytest.mark.parametrize(
    "name, fmt, subtype, stereo, min_corr",
    [
        ("clip.opus", "OGG", "OPUS", False, 0.8),
        ("clip.ogg", "OGG", "VORBIS", False, 0.8),
        ("clip.mp3", "MP3", "MPEG_LAYER_III", False, 0.8),
        ("clip24.wav", "WAV", "PCM_24", False, 0.999),
        ("stereo24.wav", "WAV", "PCM_24", True, 0.999),
        ("stereo.flac", "FLAC", "PCM_16", True, 0.999),
    ],
)
def test_real_clip_transcoded(tmp_path, name, fmt, subtype, stereo, min_corr):
    row = _source_row()
    x, rate = sf.read(str(REALSPEECH / row["file"]), dtype="float32")
    assert x.ndim == 1
    data = np.stack([x, 0.5 * x], axis=1) if stereo else x  # stereo: same speech, 6 dB apart
    path = tmp_path / name
    sf.write(str(path), data, rate, format=fmt, subtype=subtype)
    info = sf.info(str(path))
    assert (info.format, info.subtype, info.channels) == (fmt, subtype, 2 if stereo else 1)

    ref = load_audio(str(REALSPEECH / row["file"]))
    got = load_audio(str(path))
    assert got.source_sample_rate == rate and got.source_channels == (2 if stereo else 1)
    assert abs(got.duration - float(row["duration_s"])) <= 0.05
    assert abs(len(got.samples) - len(ref.samples)) <= 0.05 * 16000
    assert got.samples.dtype == np.float32 and got.samples.ndim == 1
    assert dbfs(got.samples) == pytest.approx(dbfs(ref.samples), abs=1.0)
    assert _best_correlation(ref.samples, got.samples) >= min_corr
