"""Feature configuration, log-mel features, windows, PNG images and audio decoding."""
from __future__ import annotations

import io
import json
import math
import struct
import time

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from conftest import tone, write_wav
from langid.audio import AudioError, dbfs, decode, load_audio, normalize
from langid.config import FeatureConfig
from langid.features import file_flags, log_mel, to_png, window_starts, windows

CFG = FeatureConfig()
SR = CFG.sample_rate


# --- FeatureConfig -------------------------------------------------------------------------------

def test_config_json_round_trip():
    for cfg in (FeatureConfig(), FeatureConfig(sample_rate=22050, window_seconds=2.5, n_fft=512, hop_length=128,
                                               n_mels=40, fmin=50.0, fmax=11025.0, top_db=60.0, silence_dbfs=-50.0)):
        s = cfg.to_json()
        back = FeatureConfig.from_json(s)
        assert back == cfg
        assert FeatureConfig.from_json(s.encode()) == cfg
        assert json.loads(s) == cfg.to_dict()
        assert type(back.sample_rate) is int and type(back.n_mels) is int
        assert type(back.window_seconds) is float and type(back.fmin) is float
    # ints written for float fields (as a person editing JSON would) come back as floats, equal config
    assert FeatureConfig.from_dict({"window_seconds": 10, "fmax": 8000}) == FeatureConfig()


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown feature-config keys.*n_melz"):
        FeatureConfig.from_json('{"n_melz": 64}')


@pytest.mark.parametrize(
    "d",
    [
        {"n_mels": "64"}, {"n_mels": None}, {"n_mels": True}, {"window_seconds": [10]},
        {"sample_rate": 0}, {"sample_rate": -16000}, {"window_seconds": 0}, {"window_seconds": -1.0},
        {"fmin": 9000.0}, {"fmin": -1.0}, {"fmax": 9000.0}, {"fmin": 500.0, "fmax": 500.0},
        {"n_fft": 0}, {"hop_length": 0}, {"n_mels": -1}, {"db_floor": 0.0, "db_ceil": 0.0},
    ],
)
def test_config_rejects_bad_values(d):
    with pytest.raises(ValueError):
        FeatureConfig.from_dict(d)


@pytest.mark.parametrize("text", ['{"window_seconds": NaN}', '{"window_seconds": Infinity}', '{"db_floor": NaN}',
                                  '{"n_mels": 64.5}'])
def test_config_rejects_non_finite(text):
    with pytest.raises(ValueError):
        FeatureConfig.from_json(text)


def test_config_frames():
    assert CFG.window_samples == 160000
    assert CFG.window_frames == 1001
    assert FeatureConfig(window_seconds=2.5, hop_length=128).window_frames == 1 + 40000 // 128


# --- log_mel -------------------------------------------------------------------------------------

def test_log_mel_full_window():
    x = tone(440.0, CFG.window_seconds, SR)
    spec = log_mel(x, CFG)
    assert spec.shape == (CFG.n_mels, CFG.window_frames)
    assert spec.dtype == np.float32
    assert spec.min() >= 0.0 and spec.max() <= 1.0
    assert spec.max() == pytest.approx(1.0)  # referenced to its maximum
    assert np.array_equal(spec, log_mel(x.copy(), CFG))  # deterministic, bitwise

    small = FeatureConfig(n_mels=32, hop_length=200, window_seconds=2.0)
    assert log_mel(x[: small.window_samples], small).shape == (32, small.window_frames)


def test_log_mel_level_invariant():
    x = tone(440.0, 2.0, SR, amplitude=0.5) + tone(2500.0, 2.0, SR, amplitude=0.1, seed=1)
    a, b = log_mel(x, CFG), log_mel((0.1 * x).astype(np.float32), CFG)
    assert np.max(np.abs(a - b)) < 1e-3
    # but the content matters: another signal gives other features
    assert np.max(np.abs(a - log_mel(tone(1000.0, 2.0, SR), CFG))) > 0.2


def test_log_mel_tone_bands():
    def band(freq):
        spec = log_mel(tone(freq, 2.0, SR, amplitude=0.5), CFG)
        return int(np.argmax(spec.mean(axis=1)))

    low, mid, high = band(300.0), band(1000.0), band(3000.0)
    assert 0 <= low < mid < high < CFG.n_mels
    assert high - low > 10


def test_log_mel_silence_is_finite():
    spec = log_mel(np.zeros(SR, np.float32), CFG)
    assert np.all(np.isfinite(spec)) and spec.min() >= 0 and spec.max() <= 1


# --- windows -------------------------------------------------------------------------------------

def test_window_starts_by_hand():
    size = CFG.window_samples  # 10 s = 160000 samples
    assert window_starts(0, CFG) == [0]
    assert window_starts(SR * 3, CFG) == [0]              # short: one (padded) window
    assert window_starts(size, CFG) == [0]                # exactly one window
    assert window_starts(size + 1, CFG) == [0]            # a one-sample tail is dropped
    assert window_starts(SR * 20, CFG) == [0, size]       # exactly two
    # 25 s: two full windows (0, 10 s) and a 5 s tail (20 s), exactly half a window: kept
    assert window_starts(SR * 25, CFG) == [0, 160000, 320000]
    # 24.99 s: the tail is 4.99 s, under half a window: dropped
    assert window_starts(SR * 25 - 160, CFG) == [0, 160000]
    assert window_starts(SR * 25 - 1, CFG) == [0, 160000]
    # 15 s: one full window and a 5 s tail
    assert window_starts(SR * 15, CFG) == [0, 160000]
    # overlapping windows with a 5 s hop over 40 s: full windows every 5 s up to 30 s
    assert window_starts(SR * 40, CFG, hop_seconds=5.0)[:7] == [0, 80000, 160000, 240000, 320000, 400000, 480000]


def test_window_starts_overlapping_hop_adds_no_redundant_tail():
    # 20 s, 10 s windows every 5 s: windows at 0, 5, 10 s cover everything; a padded window at 15 s adds nothing
    assert window_starts(SR * 20, CFG, hop_seconds=5.0) == [0, 80000, 160000]
    assert window_starts(SR * 25, CFG, hop_seconds=5.0) == [0, 80000, 160000, 240000]
    # 27 s: full windows end at 25 s; the 2 s left over get a tail window at 20 s holding 7 s (>= half): kept
    assert window_starts(SR * 27, CFG, hop_seconds=5.0) == [0, 80000, 160000, 240000, 320000]
    # 24 s: full windows end at 20 s; the 4 s left over get a tail window at 15 s holding 9 s: kept
    assert window_starts(SR * 24, CFG, hop_seconds=5.0) == [0, 80000, 160000, 240000]


def test_windows_short_signal_padded():
    x = tone(440.0, 3.0, SR)
    out = list(windows(x, CFG))
    assert len(out) == 1
    start, chunk, flags = out[0]
    assert start == 0.0 and len(chunk) == CFG.window_samples
    assert "padded" in flags and "silent" not in flags
    assert np.array_equal(chunk[: len(x)], x) and not chunk[len(x):].any()


def test_windows_25s():
    x = tone(440.0, 25.0, SR)
    out = list(windows(x, CFG))
    assert [s for s, _, _ in out] == [0.0, 10.0, 20.0]
    assert all(len(c) == CFG.window_samples for _, c, _ in out)
    assert [f for _, _, f in out] == [[], [], ["padded"]]
    assert np.array_equal(out[1][1], x[160000:320000])
    assert np.array_equal(out[2][1][:80000], x[320000:]) and not out[2][1][80000:].any()
    assert [s for s, _, _ in windows(x[: SR * 25 - 1], CFG)] == [0.0, 10.0]


def test_windows_silent_flag():
    quiet = np.concatenate([tone(440.0, 10.0, SR), np.zeros(10 * SR, np.float32),
                            1e-5 * tone(440.0, 10.0, SR)]).astype(np.float32)
    flags = [f for _, _, f in windows(quiet, CFG)]
    assert flags == [[], ["silent"], ["silent"]]
    assert ["padded", "silent"] == list(windows(np.zeros(SR, np.float32), CFG))[0][2]


def test_file_flags():
    assert file_flags(5.0, -20.0, -3.0, CFG) == []
    assert file_flags(0.5, -70.0, 0.0, CFG) == ["silent", "short", "clipped"]


# --- PNG -----------------------------------------------------------------------------------------

def test_to_png_deterministic_and_oriented():
    spec = log_mel(tone(300.0, 2.0, SR, amplitude=0.5), CFG)
    png = to_png(spec)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png == to_png(spec.copy())
    img = Image.open(io.BytesIO(png))
    assert img.mode == "L" and img.size == (spec.shape[1], spec.shape[0])  # width = frames, height = mels

    ramp = np.zeros((CFG.n_mels, 5), np.float32)
    ramp[0] = 1.0  # energy only in the lowest band
    pixels = np.asarray(Image.open(io.BytesIO(to_png(ramp))))
    assert pixels[-1].tolist() == [255] * 5  # lowest band in the bottom row
    assert not pixels[:-1].any()
    # a 300 Hz tone: its brightest row is in the lower half of the picture
    rows = np.asarray(img).astype(float).mean(axis=1)
    assert np.argmax(rows) > CFG.n_mels // 2


# --- decode / load_audio -------------------------------------------------------------------------

def test_stereo_downmix_is_mean(tmp_path):
    left = tone(440.0, 1.0, SR, amplitude=0.4)
    right = tone(1000.0, 1.0, SR, amplitude=0.2, seed=1)
    path = write_wav(tmp_path / "s.wav", np.stack([left, right], axis=1), SR, subtype="FLOAT")
    samples, rate, channels = decode(str(path))
    assert (rate, channels) == (SR, 2)
    assert samples.dtype == np.float32 and samples.ndim == 1
    np.testing.assert_allclose(samples, (left + right) / 2, atol=1e-6)
    a = load_audio(str(path))
    assert a.source_channels == 2 and a.samples.ndim == 1


def test_an_arrays_level_is_its_mono_mix_as_a_files_is(tmp_path):
    """predict() on a stereo array and on the same samples in a file decide speech from the same level: a pair of
    channels in opposite phase mixes to silence either way."""
    from langid.audio import audio_from_array

    x = tone(220, 1.0, 16000, amplitude=0.5)
    stereo = np.stack([x, -x], axis=1)
    path = tmp_path / "opposite.wav"
    sf.write(path, stereo, 16000, subtype="FLOAT")
    from_file, from_array = load_audio(str(path)), audio_from_array(stereo, 16000)
    assert from_array.source_channels == from_file.source_channels == 2
    assert from_array.rms_dbfs == pytest.approx(from_file.rms_dbfs, abs=0.1)
    assert from_array.rms_dbfs < -100  # the mix, not the channels (each at -9 dBFS)


@pytest.mark.parametrize("rate, seconds", [(44100, 1.0), (8000, 1.0), (48000, 2.5), (22050, 0.3), (16000, 1.7)])
def test_resample_length(tmp_path, rate, seconds):
    path = write_wav(tmp_path / f"r{rate}.wav", tone(440.0, seconds, rate), rate)
    a = load_audio(str(path))
    assert a.sample_rate == 16000 and a.source_sample_rate == rate and a.source_channels == 1
    assert abs(len(a.samples) - seconds * 16000) <= 1
    assert a.duration == pytest.approx(int(seconds * rate) / rate)
    assert a.samples.dtype == np.float32
    # the tone survives resampling: its spectral peak is still at 440 Hz
    spec = np.abs(np.fft.rfft(a.samples))
    assert abs(np.argmax(spec) * 16000 / len(a.samples) - 440.0) < 5.0


@pytest.mark.parametrize("amplitude", [0.9, 0.05, 0.003])
def test_normalisation_to_minus_20_dbfs(tmp_path, amplitude):
    sine = (amplitude * np.sin(2 * np.pi * 440.0 * np.arange(SR) / SR)).astype(np.float32)
    path = write_wav(tmp_path / "n.wav", sine, SR, subtype="FLOAT")
    a = load_audio(str(path))
    assert dbfs(a.samples) == pytest.approx(-20.0, abs=0.5)
    assert a.rms_dbfs == pytest.approx(20 * math.log10(amplitude / math.sqrt(2)), abs=0.5)  # the source level


def test_normalisation_caps_gain_and_clipping():
    faint = (1e-5 * np.ones(100)).astype(np.float32)
    assert dbfs(normalize(faint)) == pytest.approx(dbfs(faint) + 40.0, abs=0.01)  # not blown up to -20
    spiky = np.zeros(1000, np.float32)
    spiky[0] = 0.01
    assert float(np.max(np.abs(normalize(spiky)))) <= 1.0


@pytest.mark.parametrize("subtype", ["PCM_24", "PCM_32", "FLOAT", "DOUBLE", "PCM_U8"])
def test_wav_subtypes(tmp_path, subtype):
    x = tone(440.0, 0.5, SR, amplitude=0.5)
    path = write_wav(tmp_path / f"{subtype}.wav", x, SR, subtype=subtype)
    assert sf.info(str(path)).subtype == subtype
    samples, rate, channels = decode(str(path))
    assert (rate, channels, len(samples)) == (SR, 1, len(x))
    tol = 1e-2 if subtype == "PCM_U8" else 1e-4
    np.testing.assert_allclose(samples, x, atol=tol)


def test_decode_bytes_and_file_object(tmp_path):
    path = write_wav(tmp_path / "a.flac", tone(440.0, 0.5, SR), SR)
    data = path.read_bytes()
    ref, _, _ = decode(str(path))
    assert np.array_equal(decode(data)[0], ref)
    with open(path, "rb") as f:
        assert np.array_equal(decode(f)[0], ref)


def _assert_audio_error(source, *words):
    with pytest.raises(AudioError) as ei:
        load_audio(source)
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < 300, msg
    for w in words:
        assert w in msg.lower(), msg
    return msg


def test_errors_empty_and_directory(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    _assert_audio_error(str(tmp_path / "empty.wav"), "empty")
    _assert_audio_error(str(tmp_path), "directory")
    _assert_audio_error(str(tmp_path / "missing.wav"), "cannot open")
    _assert_audio_error(b"", "not a readable audio file")


def test_errors_text_and_truncated_header(tmp_path):
    (tmp_path / "notes.wav").write_text("these are my notes, not audio\n" * 30)
    _assert_audio_error(str(tmp_path / "notes.wav"), "not a readable audio file")
    good = write_wav(tmp_path / "good.wav", tone(440.0, 0.5, SR), SR).read_bytes()
    (tmp_path / "trunc.wav").write_bytes(good[:20])  # cut inside the fmt chunk
    _assert_audio_error(str(tmp_path / "trunc.wav"), "not a readable audio file")
    (tmp_path / "hdr.wav").write_bytes(good[:44])  # a complete header and no samples
    _assert_audio_error(str(tmp_path / "hdr.wav"), "no audio samples")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_errors_non_finite_float_wav(tmp_path, bad):
    x = tone(440.0, 0.5, SR)
    x[1234] = bad
    path = write_wav(tmp_path / "nan.wav", x, SR, subtype="FLOAT")
    _assert_audio_error(str(path), "nan or infinite")


def test_error_over_max_seconds(tmp_path):
    path = write_wav(tmp_path / "long.wav", tone(440.0, 3.0, 8000), 8000)
    with pytest.raises(AudioError, match="longer than the limit"):
        load_audio(str(path), max_seconds=1.0)
    assert load_audio(str(path), max_seconds=5.0).duration == pytest.approx(3.0)


def test_huge_declared_length_tiny_body(tmp_path):
    x = tone(440.0, 0.5, SR)
    raw = bytearray(write_wav(tmp_path / "small.wav", x, SR).read_bytes())
    assert raw[:4] == b"RIFF" and raw[8:12] == b"WAVE"
    data_at = raw.index(b"data")
    struct.pack_into("<I", raw, 4, 0x7FFFFFF0)             # RIFF size
    struct.pack_into("<I", raw, data_at + 4, 0x7FFFFFF0)   # data chunk size: ~1 GSample declared
    path = tmp_path / "huge.wav"
    path.write_bytes(bytes(raw))
    assert struct.unpack_from("<I", path.read_bytes(), data_at + 4)[0] == 0x7FFFFFF0

    import tracemalloc

    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        try:
            samples, rate, _ = decode(str(path))
        except AudioError:
            samples = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 5.0
    assert peak < 64 * 2**20, peak  # no allocation sized from the header
    if samples is not None:
        assert rate == SR and len(samples) == len(x)
        np.testing.assert_allclose(samples, x, atol=1e-4)
    # the same from memory (bytes), where no file size is there to check the header against
    samples2 = None
    try:
        samples2 = decode(bytes(raw))[0]
    except AudioError:
        pass
    assert samples2 is None or len(samples2) == len(x)


def _librosa_log_mel(samples: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """The features as langid computed them through librosa before it did the same operations itself."""
    import librosa

    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak > 1.0:
        samples = samples / np.float32(peak)
    stft = librosa.stft(samples, n_fft=cfg.n_fft, hop_length=cfg.hop_length, center=True, pad_mode="constant")
    basis = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin,
                                fmax=cfg.fmax).astype(np.float32)
    db = librosa.power_to_db(basis @ (np.abs(stft) ** 2).astype(np.float32), ref=np.max, amin=1e-10, top_db=cfg.top_db)
    return np.clip((db - cfg.db_floor) / (cfg.db_ceil - cfg.db_floor), 0.0, 1.0).astype(np.float32)


@pytest.mark.parametrize("cfg", [FeatureConfig(), FeatureConfig(sample_rate=16000, window_seconds=1.0, n_mels=32,
                                                                 hop_length=160, fmax=8000),
                                 FeatureConfig(sample_rate=22050, n_fft=2048, hop_length=512, n_mels=128, fmin=20.0)])
def test_log_mel_equals_librosa(cfg):
    """langid's own STFT, mel filters and dB (no librosa import in the workers) give librosa's values: the trained
    models depend on them."""
    rng = np.random.default_rng(3)
    for n in (cfg.window_samples, cfg.window_samples // 3 + 7, cfg.n_fft + 1):
        x = (0.3 * rng.standard_normal(n)).astype(np.float32)
        np.testing.assert_allclose(log_mel(x, cfg), _librosa_log_mel(x, cfg), rtol=0, atol=1e-6)
    loud = (3.0 * rng.standard_normal(cfg.window_samples)).astype(np.float32)  # above full scale: normalised first
    np.testing.assert_allclose(log_mel(loud, cfg), _librosa_log_mel(loud, cfg), rtol=0, atol=1e-6)
