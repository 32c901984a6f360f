"""Speech for the Whisper tests: real Common Voice clips where ../shared has them, else espeak-ng speech made here.

Whisper knows espeak's English and Spanish well (its German less so): tests that may run on generated speech
use en and es. `COMMONVOICE` is read at each call, so a test can monkeypatch it; the environment variable
LANGID_TEST_COMMONVOICE points it elsewhere for a whole run (a folder that does not exist: generated speech
only, as in a fresh clone without ../shared).
"""
from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import numpy as np

RATE = 16000
# as conftest's SHARED (not imported: this module must not need pytest), ../shared/data/commonvoice
COMMONVOICE = Path(os.environ.get("LANGID_TEST_COMMONVOICE")
                   or Path(__file__).resolve().parents[2].parent / "shared" / "data" / "commonvoice")


def real_speech_available() -> bool:
    """Whether `speech` gives Common Voice clips (else espeak-ng speech)."""
    return (COMMONVOICE / "manifest.tsv").exists()


def speech(lang: str, seconds: float, seed: int = 0) -> np.ndarray:
    """`seconds` of speech in `lang` at 16 kHz: Common Voice clips of one speaker after another, or espeak-ng."""
    parts, total = [], 0
    if real_speech_available():
        from langid.audio import load_audio

        with open(COMMONVOICE / "manifest.tsv", newline="") as f:
            rows = [r for r in csv.DictReader(f, delimiter="\t") if r["language"] == lang]
        for r in rows[seed * 7:] + rows:
            x = load_audio(str(COMMONVOICE / r["file"]), RATE).samples
            parts.append(x)
            total += len(x)
            if total >= seconds * RATE:
                break
    else:
        import soxr

        from langid.synthesis import SYNTH_RATE, pseudo_text, synthesize

        rng = random.Random(seed)
        while total < seconds * RATE:
            x = soxr.resample(synthesize(pseudo_text(lang, 30, rng), lang), SYNTH_RATE, RATE)
            parts.append(0.9 * x / max(float(np.abs(x).max()), 1e-9))  # resampling can overshoot 1
            total += len(x)
    return np.concatenate(parts)[: int(seconds * RATE)].astype(np.float32)
