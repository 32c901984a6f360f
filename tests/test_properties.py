"""Property tests (hypothesis): the Kaggle name parser, the feature pipeline's input handling, the label CSV.

Each property states what must hold for every input of its kind, not for a few chosen examples: the parser
raises only its documented `BadName`, the pipeline gives a documented error or finite features of the
expected shape in [0, 1], and the label job's CSV gives back any file name exactly.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import soundfile as sf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from langid.audio import AudioError, dbfs, decode, from_array, normalize
from langid.config import FeatureConfig
from langid.features import log_mel, window_features, window_starts, windows
from langid.labeling import LabelOptions, answer_rows, csv_columns, recover_partial, result_schema, to_wire
from langid.sources import KAGGLE_PATTERN, BadName, parse_kaggle_name

pytestmark = pytest.mark.filterwarnings("ignore:n_fft=.* is too large")  # librosa, on signals shorter than n_fft

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# small windows keep each example to milliseconds
CFG = FeatureConfig(sample_rate=16000, window_seconds=0.1, n_fft=128, hop_length=64, n_mels=16)


# ---------------------------------------------------------------- (a) the Kaggle name parser

LANGUAGE = st.text("abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=3)
RECORDING = st.text("0123456789abcdef", min_size=32, max_size=32)
NUMBER = st.text("0123456789", min_size=1, max_size=9)  # leading zeros included
AUGMENTATION = st.none() | st.tuples(st.sampled_from(["speed", "pitch", "noise"]), NUMBER)
FOLDER = st.sampled_from(["", "/", "train/train/", "/data/kaggle/test/de/"]) | st.text(max_size=20).map(lambda t: t + "/")


def kaggle(language, gender, recording, fragment, augmentation) -> str:
    aug = f".{augmentation[0]}{augmentation[1]}" if augmentation else ""
    return f"{language}_{gender}_{recording}.fragment{fragment}{aug}.flac"


@SETTINGS
@given(LANGUAGE, st.sampled_from("mf"), RECORDING, NUMBER, AUGMENTATION, FOLDER)
def test_kaggle_names_round_trip_to_their_parts(language, gender, recording, fragment, augmentation, folder):
    parsed = parse_kaggle_name(folder + kaggle(language, gender, recording, fragment, augmentation))
    assert parsed == {"language": language, "gender": gender, "recording_id": recording, "fragment": int(fragment),
                      "augmentation": augmentation[0] if augmentation else "original",
                      "augmentation_index": int(augmentation[1]) if augmentation else None}


def _canonical(base: str) -> str:
    """The name with the leading zeros of its fragment and augmentation numbers dropped."""
    return re.sub(r"(fragment|speed|pitch|noise)0+(?=[0-9])", r"\1", base)


def _check_parse(name: str) -> None:
    """Only BadName (naming the name and the pattern), or fields that rebuild the name exactly."""
    try:
        parsed = parse_kaggle_name(name)
    except BadName as e:
        assert name in str(e) and KAGGLE_PATTERN in str(e)
        return
    aug = None if parsed["augmentation"] == "original" else (parsed["augmentation"], parsed["augmentation_index"])
    rebuilt = kaggle(parsed["language"], parsed["gender"], parsed["recording_id"], parsed["fragment"], aug)
    assert rebuilt == _canonical(os.path.basename(name)), (name, parsed)
    assert 0 <= parsed["fragment"] < 2 ** 31 and 0 <= (parsed["augmentation_index"] or 0) < 2 ** 31  # int32


@SETTINGS
@given(st.text(max_size=80))
@example("en_m_0123456789abcdef0123456789abcdef.fragment0.flac")
def test_any_text_parses_or_raises_bad_name(name):
    _check_parse(name)


@SETTINGS
@given(LANGUAGE, st.sampled_from("mf"), RECORDING, NUMBER, AUGMENTATION, st.data())
def test_damaged_kaggle_names_are_refused_or_still_exact(language, gender, recording, fragment, augmentation, data):
    """A valid name with text inserted anywhere either still follows the pattern exactly or is refused."""
    name = kaggle(language, gender, recording, fragment, augmentation)
    at = data.draw(st.integers(0, len(name)))
    _check_parse(name[:at] + data.draw(st.text(min_size=1, max_size=3)) + name[at:])


@pytest.mark.parametrize("name", [
    f"en_m_{'0' * 32}.fragment0.flac\n",  # `$` accepted a final newline
    f"en_m_{'0' * 32}.fragment1234567890.flac",  # 10 digits: past the store's int32
    f"en_m_{'0' * 32}.fragment1.speed{'9' * 5000}.flac",  # int() refuses 4,300+ digits with a ValueError
    f"en_m_{'0' * 32}.fragment\u0663.flac",  # an Arabic-Indic digit
    f"en_m_{'0' * 32}.fragment\uff11.flac",  # a fullwidth digit
])
def test_near_misses_of_the_kaggle_pattern_are_refused(name):
    with pytest.raises(BadName):
        parse_kaggle_name(name)
    _check_parse(name)


# ---------------------------------------------------------------- (b) the feature pipeline's input handling

FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)
SPECIAL = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 3.4e38, -3.4e38, 1e-45])


@st.composite
def signals(draw, max_frames: int = 3000):
    """Arrays as callers hand them in: tones, noise, silence, impulses at any level, any channel count,
    sometimes with NaN/inf or extreme values; or arbitrary arrays of any shape."""
    if draw(st.booleans()):
        shape = draw(array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40))
        return draw(arrays(draw(st.sampled_from([np.float32, np.float64])), shape, elements=FLOATS))
    n = draw(st.integers(0, max_frames))
    kind = draw(st.sampled_from(["tone", "noise", "zeros", "impulse"]))
    level = draw(st.sampled_from([1e-40, 1e-6, 0.3, 1.0, 32767.0, 1e30, 3e38]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    x = {"tone": lambda: np.sin(np.arange(n) * draw(st.floats(0.01, 3.0))), "noise": lambda: rng.uniform(-1, 1, n),
         "zeros": lambda: np.zeros(n), "impulse": lambda: np.eye(1, n, n // 2)[0] if n else np.zeros(0)}[kind]()
    x = (x * level).astype(np.float32)
    for _ in range(draw(st.integers(0, 2))):
        if n:
            x[draw(st.integers(0, n - 1))] = draw(SPECIAL)
    channels = draw(st.sampled_from([None, 1, 2, 8]))
    return x if channels is None else np.repeat(x[:, None], channels, axis=1)


def _usable(x: np.ndarray) -> bool:
    """What the documented contract accepts: (frames,) or (frames, channels), not empty, all finite."""
    return x.ndim in (1, 2) and x.size > 0 and bool(np.all(np.isfinite(x)))


def _check_specs(specs: np.ndarray, n_samples: int) -> None:
    assert specs.dtype == np.float32
    assert specs.shape == (len(window_starts(n_samples, CFG)), CFG.n_mels, CFG.window_frames)
    assert np.all(np.isfinite(specs)) and specs.min() >= 0.0 and specs.max() <= 1.0


@SETTINGS
@given(signals(), st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000, 96000]))
def test_arrays_give_a_documented_error_or_finite_features(x, rate):
    """from_array (the API's array path and the tail of every file decode) then window_features."""
    try:
        samples = from_array(x, rate, CFG.sample_rate)
    except AudioError as e:
        assert not _usable(x), x
        assert str(e) and "\n" not in str(e)
        return
    assert _usable(x), x.shape
    assert samples.ndim == 1 and samples.dtype == np.float32 and np.all(np.isfinite(samples))
    assert abs(len(samples) - len(x) * CFG.sample_rate / rate) <= 1
    specs, starts, speech = window_features(samples, CFG, source_dbfs=dbfs(x))
    _check_specs(specs, len(samples))
    assert starts.shape == speech.shape == (len(specs),) and speech.dtype == bool


@SETTINGS
@given(signals(max_frames=1500).filter(lambda x: x.ndim == 1))
def test_log_mel_and_windows_of_any_mono_signal(x):
    """Direct callers of the feature functions: NaN/inf is an AudioError, anything finite gives features."""
    if not np.all(np.isfinite(x)):
        with pytest.raises(AudioError, match="NaN or infinite"):
            window_features(x, CFG, source_dbfs=0.0)
        with pytest.raises(AudioError, match="NaN or infinite"):
            log_mel(x, CFG)
        return
    spec = log_mel(x, CFG)
    assert spec.shape == (CFG.n_mels, 1 + len(x) // CFG.hop_length)
    assert np.all(np.isfinite(spec)) and spec.min() >= 0.0 and spec.max() <= 1.0
    specs, starts, speech = window_features(x, CFG, source_dbfs=dbfs(x))
    _check_specs(specs, len(x))
    cut = list(windows(x, CFG))
    assert [s for s, _, _ in cut] == [s / CFG.sample_rate for s in window_starts(len(x), CFG)] == starts.tolist()
    for start, chunk, flags in cut:
        assert len(chunk) == CFG.window_samples and set(flags) <= {"padded", "silent"}
        assert ("padded" in flags) == (round(start * CFG.sample_rate) + CFG.window_samples > len(x))
    assert speech.tolist() == ["silent" not in f for _, _, f in cut]


@SETTINGS
@given(signals(max_frames=2000).filter(lambda x: x.ndim == 1 and x.size and np.all(np.isfinite(x))))
def test_normalize_any_finite_signal(x):
    out = normalize(x)
    assert out.dtype == np.float32 and out.shape == x.shape and np.all(np.isfinite(out))
    assert float(np.max(np.abs(out))) <= 1.0 + 1e-6  # never past full scale
    assert dbfs(out) <= -20.0 + 0.01  # at most the target level; less only where gain is capped or peaks limit it


@SETTINGS
@given(st.binary(max_size=400) | st.sampled_from(["WAV", "FLAC", "OGG", "AIFF"]).flatmap(
    lambda fmt: st.tuples(st.just(fmt), st.integers(0, 3000), st.binary(max_size=8), st.integers(0, 10 ** 6))))
def test_decoding_any_bytes_gives_samples_or_an_audio_error(spec):
    """Arbitrary bytes, and real files cut short or with bytes overwritten: finite mono samples or AudioError."""
    if isinstance(spec, tuple):
        fmt, cut, junk, at = spec
        buf = io.BytesIO()
        sf.write(buf, np.sin(np.arange(2000) / 3).astype(np.float32) * 0.3, 8000, format=fmt)
        data = bytearray(buf.getvalue()[: max(cut, 1)])
        at %= len(data)
        data[at:at + len(junk)] = junk
        spec = bytes(data)
    try:
        samples, rate, channels = decode(spec, max_seconds=60)
    except AudioError as e:
        assert str(e) and "\n" not in str(e) and len(str(e)) < 300
        return
    assert samples.ndim == 1 and samples.size > 0 and np.all(np.isfinite(samples))
    assert rate > 0 and channels > 0


# ---------------------------------------------------------------- (c) the label job's CSV writer

# names as the job meets them: the bytes of a file or member name (any but NUL, which no name holds), mixing
# text and bytes that are not UTF-8, as Python hands them over: os.fsdecode, odd bytes as surrogate escapes
NAME_PIECE = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), min_size=1,
                     max_size=20).map(str.encode) | st.binary(min_size=1, max_size=20)
NAMES = st.lists(NAME_PIECE, min_size=1, max_size=3).map(b"".join).map(lambda b: os.fsdecode(b.replace(b"\x00", b"_")))


@SETTINGS
@given(NAMES, NAMES, st.sampled_from(["", "/data/in/", "archive.tar::"]))
@example("nan", "NA", "")
@example('"quoted", comma\r\nnew line\r', os.fsdecode(b"caf\xe9 \xff"), "/d/")
def test_csv_rows_give_back_any_file_name(name, error, prefix):
    path = prefix + name
    labels, opts = ["de", "en"], LabelOptions(probabilities=True)
    # the keys travel through Arrow (Ray Data) between reading, decoding and the driver: UTF-8 only
    ok = {"path": to_wire(path), "language": "en", "confidence": 0.75, "top_languages": "en:0.7500 de:0.2500",
          "duration": 1.5, "windows": 2, "windows_used": 2, "status": "ok", "error": None,
          "probabilities": [0.25, 0.75], "segments": []}
    failed = {**ok, "path": to_wire(path + ".2"), "language": "", "confidence": None, "top_languages": "",
              "duration": None, "windows": 0, "windows_used": 0, "status": "error", "error": to_wire(error),
              "probabilities": [float("nan")] * 2}
    answers = pa.Table.from_pylist([ok, failed], schema=result_schema(len(labels)))
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "labels.csv")
        with open(out, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:  # as run_label writes
            w = csv.writer(f)
            w.writerow(csv_columns(labels, opts))
            w.writerows(answer_rows(answers, opts))
        # object, not str: pandas' own string dtype is Arrow's, which refuses the surrogate escapes
        df = pd.read_csv(out, dtype=object, keep_default_na=False, encoding_errors="surrogateescape")
        assert df.path.tolist() == [path, path + ".2"]
        assert df.error.tolist() == ["", error] and df.status.tolist() == ["ok", "error"]
        assert df.p_en.tolist() == ["0.750000", ""]
        before = open(out, "rb").read()
        assert recover_partial(out, csv_columns(labels, opts)) == {path, path + ".2"}  # the resume reader agrees
        assert open(out, "rb").read() == before
