"""The espeak-ng demo corpus: real synthesis, the Kaggle layout, speaker-disjoint splits, idempotent reruns."""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import NOISE, REPO
from langid.sources import parse_kaggle_name, scan_kaggle
from langid.synthesis import (
    FRAGMENT_SAMPLES,
    SYNTH_RATE,
    augment,
    build_demo_corpus,
    make_speakers,
    pseudo_text,
    synthesize,
)

TEXT = "Seven hotels open in the center of the city."
SMALL = dict(languages=("en", "es"), train_speakers=2, test_speakers=1, fragments=2, speed=1, pitch=1, noise=1,
             seed=3, progress=False)
# train: 2 languages x 2 speakers x 2 fragments x (original + 3 augmentations); test: 2 x 1 x 2 originals
N_TRAIN, N_TEST = 32, 4


def median_f0(x: np.ndarray) -> float:
    """Median autocorrelation pitch of the loud frames (librosa.yin crashes in numba on this machine)."""
    n = 1024
    frames = np.lib.stride_tricks.sliding_window_view(x, n)[:: n // 2]
    rms = np.sqrt((frames ** 2).mean(axis=1))
    lo, hi = SYNTH_RATE // 400, SYNTH_RATE // 60
    f0 = []
    for fr in frames[rms > 0.3 * rms.max()]:
        ac = np.fft.irfft(np.abs(np.fft.rfft(fr - fr.mean(), 2 * n)) ** 2)[:n]
        f0.append(SYNTH_RATE / (lo + np.argmax(ac[lo:hi])))
    return float(np.median(f0))


def spectrum(x: np.ndarray) -> np.ndarray:
    """Long-term log spectrum: differs between languages/voices, nearly equal for a repeated call."""
    frames = np.lib.stride_tricks.sliding_window_view(x, 512)[::256] * np.hanning(512)
    return np.log(np.abs(np.fft.rfft(frames, axis=1)).mean(axis=0) + 1e-6)


# --- synthesize ----------------------------------------------------------------------------------

@pytest.mark.parametrize("language", ["en", "de", "es"])
def test_synthesize_gives_speech_of_plausible_length(language):
    x = synthesize(TEXT, language)
    assert x.dtype == np.float32 and x.ndim == 1
    assert 1.5 < len(x) / SYNTH_RATE < 8  # nine words at 175 words/minute
    assert 0.05 < np.abs(x).max() <= 1.0
    assert np.sqrt(np.mean(x ** 2)) > 0.01


def test_languages_and_voices_change_the_audio():
    en, again = synthesize(TEXT, "en"), synthesize(TEXT, "en")
    self_distance = np.linalg.norm(spectrum(en) - spectrum(again))
    for voice in ("de", "es", "en+f3"):
        assert np.linalg.norm(spectrum(en) - spectrum(synthesize(TEXT, voice))) > 3 * self_distance, voice
    # a female variant and the pitch parameter really move the voice's pitch
    assert median_f0(synthesize(TEXT, "en+f3")) > 1.5 * median_f0(synthesize(TEXT, "en+m3"))
    assert median_f0(synthesize(TEXT, "en", pitch=80)) > 1.3 * median_f0(synthesize(TEXT, "en", pitch=20))
    assert len(synthesize(TEXT, "en", rate=120)) > 1.8 * len(synthesize(TEXT, "en", rate=300))


@pytest.mark.parametrize("voice, word", [("xx", "xx"), ("en+nosuchvariant", "nosuchvariant")])
def test_unknown_voice_is_a_clear_error(voice, word):
    # espeak itself would silently keep the previous voice or ignore the variant
    with pytest.raises(ValueError, match=word):
        synthesize(TEXT, voice)


# --- text, speakers, augmentations ---------------------------------------------------------------

def test_pseudo_text_is_seeded_sentences_from_the_language():
    text = pseudo_text("de", 200, random.Random(1))
    assert text == pseudo_text("de", 200, random.Random(1)) != pseudo_text("de", 200, random.Random(2))
    sentences = re.findall(r"[^.]+\.", text)
    assert sentences and "".join(sentences).replace(". ", ".") == text.replace(". ", ".")
    for s in sentences:
        words = s.strip().rstrip(".").split()
        assert 6 <= len(words) <= 14 and words[0][0].isupper()
    import wordfreq

    assert set(text.lower().replace(".", "").split()) <= set(wordfreq.top_n_list("de", 2000))
    assert Counter(text.lower().split())["die"] > 0  # frequency-weighted: the commonest words recur
    assert pseudo_text("eo", 20, random.Random(0))  # wordfreq lacks Esperanto: the built-in list
    with pytest.raises(ValueError, match="'af'"):  # espeak speaks Afrikaans but there are no words for it
        pseudo_text("af", 20, random.Random(0))


def test_speakers_are_disjoint_between_train_and_test_across_languages():
    speakers = [s for lang in ("en", "de", "es", "fr") for s in make_speakers(lang, 4, 2, seed=0)]
    train = {s.variant for s in speakers if s.split == "train"}
    test = {s.variant for s in speakers if s.split == "test"}
    assert train and test and not train & test
    # one id per voice, shared across languages: a split grouped by it holds a voice out everywhere
    by_voice = {}
    for s in speakers:
        by_voice.setdefault(s.variant, set()).add(s.recording_id)
    assert all(len(ids) == 1 for ids in by_voice.values())
    assert len({s.recording_id for s in speakers}) == len(by_voice) == 6
    assert all(re.fullmatch(r"[0-9a-f]{32}", s.recording_id) for s in speakers)
    en = make_speakers("en", 4, 2, seed=0)
    assert Counter(s.gender for s in en if s.split == "train") == {"m": 2, "f": 2}
    assert make_speakers("en", 4, 2, seed=0) == en != make_speakers("en", 4, 2, seed=1)
    with pytest.raises(ValueError, match="voice variants"):
        make_speakers("en", 40, 2)


def test_augmentations_keep_length_and_noise_respects_the_snr():
    t = np.arange(int(2.5 * FRAGMENT_SAMPLES)) / SYNTH_RATE
    recording = (0.3 * np.sin(2 * np.pi * 150 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)  # "syllables"
    for kind in ("speed", "pitch", "noise"):
        y = augment(recording, 1, kind, 1, "key")
        assert y.shape == (FRAGMENT_SAMPLES,) and y.dtype == np.float32 and np.all(np.isfinite(y)), kind
        assert not np.allclose(y, recording[FRAGMENT_SAMPLES:2 * FRAGMENT_SAMPLES], atol=1e-3), kind
    clean = recording[FRAGMENT_SAMPLES:2 * FRAGMENT_SAMPLES]
    for i in range(1, 6):
        noise = augment(recording, 1, "noise", i, "key") - clean
        snr = 10 * np.log10(np.mean(clean ** 2) / np.mean(noise ** 2))
        assert 5 - 0.1 < snr < 20 + 0.1
    assert np.array_equal(augment(recording, 0, "speed", 2, "key"), augment(recording, 0, "speed", 2, "key"))


# --- the corpus ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    noise_dir = str(NOISE) if NOISE.exists() else None
    result = build_demo_corpus(str(root), noise_dir=noise_dir, **SMALL)
    return root, result


def _files(root: Path) -> dict[str, list[Path]]:
    return {split: sorted((root / split / split).iterdir()) for split in ("train", "test")}


def test_corpus_has_the_kaggle_layout_and_format(corpus):
    root, result = corpus
    files = _files(root)
    assert (len(files["train"]), len(files["test"])) == (N_TRAIN, N_TEST)  # and no leftover temporary files
    assert result["total"] == result["written"] == N_TRAIN + N_TEST
    assert result["files"] == {"train": {"en": 16, "es": 16}, "test": {"en": 2, "es": 2}}
    for path in files["train"] + files["test"]:
        parse_kaggle_name(path.name)
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.frames) == (SYNTH_RATE, 1, FRAGMENT_SAMPLES)
        assert info.subtype == "PCM_16"
        x, _ = sf.read(str(path), dtype="float32")
        assert 0.85 < np.abs(x).max() < 0.92  # peak-normalised to about -1 dBFS
        assert np.sqrt(np.mean(x ** 2)) > 0.01  # speech all the way to the last fragment
    records = scan_kaggle(str(root))
    assert all(r.error is None for r in records)
    assert Counter(r.split for r in records) == {None: N_TRAIN, "test": N_TEST}


def test_corpus_splits_by_speaker_and_augments_only_train(corpus):
    root, _ = corpus
    fields = {split: [parse_kaggle_name(p.name) for p in paths] for split, paths in _files(root).items()}
    ids = {split: {f["recording_id"] for f in fs} for split, fs in fields.items()}
    # one id per voice, shared by its recordings in both languages
    assert len(ids["train"]) == SMALL["train_speakers"] and len(ids["test"]) == SMALL["test_speakers"]
    assert not ids["train"] & ids["test"]
    assert {f["augmentation"] for f in fields["test"]} == {"original"}
    assert Counter(f["augmentation"] for f in fields["train"]) == {"original": 8, "speed": 8, "pitch": 8, "noise": 8}
    assert {f["fragment"] for f in fields["train"]} == {1, 2}
    assert {f["gender"] for f in fields["train"]} == {"m", "f"}


def test_rerun_writes_nothing_and_rebuilds_deleted_files_identically(corpus):
    root, _ = corpus
    paths = [p for ps in _files(root).values() for p in ps]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}
    noise_dir = str(NOISE) if NOISE.exists() else None
    assert build_demo_corpus(str(root), noise_dir=noise_dir, **SMALL)["written"] == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths} == before
    lost = [next(p for p in paths if ".pitch1." in p.name), next(p for p in paths if p.parts[-2] == "test")]
    for p in lost:
        p.unlink()
    assert build_demo_corpus(str(root), noise_dir=noise_dir, **SMALL)["written"] == 2
    assert all(p.read_bytes() == before[p][1] for p in lost)


def test_build_is_deterministic_for_a_seed(corpus, tmp_path):
    root, _ = corpus
    noise_dir = str(NOISE) if NOISE.exists() else None
    # another worker count and language order must not change a byte
    build_demo_corpus(str(tmp_path), noise_dir=noise_dir, **{**SMALL, "languages": ("es", "en")}, workers=1)
    a, b = _files(root), _files(tmp_path)
    for split in a:
        assert [p.name for p in a[split]] == [p.name for p in b[split]]
        assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a[split], b[split]))


def test_unknown_language_fails_before_writing(tmp_path):
    with pytest.raises(ValueError, match="'xx'"):
        build_demo_corpus(str(tmp_path / "c"), languages=("en", "xx"), progress=False)
    assert not (tmp_path / "c").exists()


def test_cli_reports_bad_language_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "make_demo_corpus.py"), "--output", str(tmp_path / "c"),
                           "--languages", "en,xx"], capture_output=True, text=True, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "'xx'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c").exists()
