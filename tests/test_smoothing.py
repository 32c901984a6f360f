"""The timeline's smoothing: Viterbi over window log-posteriors, a cost per language switch (pure numpy, no Ray)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from langid.config import FeatureConfig
from langid.inference import LanguageIdentifier
from langid.labeling import LabelOptions, merge_segments
from langid.timeline import SWITCH_PENALTY, smooth_path

LABELS = ["de", "en"]
CONFIDENT = 0.9


def windows(langs: str, confidence: float = CONFIDENT, labels=LABELS) -> np.ndarray:
    """(n, C) log-posteriors, one window per letter ('d'/'e' as in LABELS), each `confidence` for its language."""
    rows = np.full((len(langs), len(labels)), (1 - confidence) / (len(labels) - 1))
    rows[np.arange(len(langs)), ["de".index(x) for x in langs]] = confidence
    return np.log(rows)


def letters(path: np.ndarray) -> str:
    return "".join("de"[i] for i in path)


def runs(path: np.ndarray) -> int:
    return len(path) and 1 + int((np.diff(path) != 0).sum())


# ---------------------------------------------------------------- what the default is chosen for

@pytest.mark.parametrize("flip", [CONFIDENT, 0.95])
def test_an_isolated_confident_flip_is_absorbed(flip):
    lp = windows("eeeeeeeeee")
    lp[4] = windows("d", flip)[0]
    assert letters(np.argmax(lp, axis=1)) == "eeeedeeeee"  # what the bare argmax said
    assert letters(smooth_path(lp)) == "eeeeeeeeee"


def test_a_sustained_switch_is_kept_where_it_happens():
    lp = windows("eeeeeddddd")
    assert letters(smooth_path(lp)) == "eeeeeddddd"


@pytest.mark.parametrize("langs", ["eeeeddeeee", "eeeeeeeedd", "ddeeeeeeee"])
def test_two_confident_windows_in_a_row_are_kept(langs):
    assert letters(smooth_path(windows(langs))) == langs


def test_a_sustained_switch_with_a_flip_on_each_side_reads_as_one_switch():
    lp = windows("eedeeeddeddd")
    assert letters(smooth_path(lp)) == "eeeeeedddddd"  # the "dd" pair at 6-7 is the start of the real switch


def test_a_low_confidence_region_makes_no_segments():
    lp = np.concatenate([windows("eeee"), windows("dedede", 0.55), windows("eeee")])
    assert runs(np.argmax(lp, axis=1)) == 7
    assert letters(smooth_path(lp)) == "e" * 14


def test_a_low_confidence_region_between_two_languages_switches_once():
    lp = np.concatenate([windows("eeee"), windows("dede", 0.55), windows("dddd")])
    assert runs(smooth_path(lp)) == 2


# ---------------------------------------------------------------- the decoding itself

def test_penalty_zero_is_each_windows_argmax():
    rng = np.random.default_rng(0)
    for n, c in [(1, 2), (7, 2), (40, 3), (200, 7)]:
        lp = torch.log_softmax(torch.from_numpy(rng.normal(0, 2, (n, c))), 1).numpy()
        lp[::5, 1] = lp[::5, 0]  # exact ties too
        lp[1::5, 1] = np.nextafter(lp[1::5, 0], 0)  # and neighbours one rounding apart
        assert np.array_equal(smooth_path(lp, 0.0), np.argmax(lp, axis=1))


@pytest.mark.parametrize("penalty", [0.3, SWITCH_PENALTY, 4.0])
def test_the_path_is_the_best_one(penalty):
    """Against every path of a few windows: the highest sum of log-probabilities less the switches' cost."""
    rng = np.random.default_rng(1)
    paths = np.array(list(itertools.product(range(3), repeat=6)))
    for _ in range(30):
        lp = torch.log_softmax(torch.from_numpy(rng.normal(0, 1.5, (6, 3))), 1).numpy()

        def score(path):  # of one path (n,) or of many (k, n)
            return lp[np.arange(6), path].sum(-1) - penalty * np.count_nonzero(np.diff(path), axis=-1)

        assert score(smooth_path(lp, penalty)) == pytest.approx(score(paths).max())


def test_a_very_high_penalty_gives_the_best_single_language():
    lp = windows("ddeeeeeddde")
    assert letters(smooth_path(lp, 1e9)) == "e" * 11


def test_ties_stay_in_the_first_language():
    assert letters(smooth_path(np.log(np.full((5, 2), 0.5)))) == "ddddd"
    # "eee" and "ede" both score 8 (4 + 0 + 4, and 4 + 2 + 4 less two switches): the one without switches
    assert letters(smooth_path(np.array([[0.0, 4.0], [2.0, 0.0], [0.0, 4.0]]), 1.0)) == "eee"


def test_one_window_and_no_windows():
    assert letters(smooth_path(windows("d"))) == "d"
    assert letters(smooth_path(windows("e", 0.6))) == "e"
    empty = smooth_path(np.zeros((0, 2)))
    assert empty.shape == (0,) and empty.dtype.kind == "i"


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_a_negative_penalty_is_refused(bad):
    with pytest.raises(ValueError, match="switch_penalty must be >= 0"):
        smooth_path(windows("ed"), bad)
    with pytest.raises(ValueError, match="--switch-penalty must be >= 0"):
        LabelOptions(switch_penalty=bad)


def test_the_cli_flag_defaults_to_the_library_default():
    from langid.cli import build_parser

    args = ["predict", "a.wav", "--model", "m"]
    assert build_parser().parse_args(args).switch_penalty == SWITCH_PENALTY
    assert build_parser().parse_args(args + ["--switch-penalty", "0"]).switch_penalty == 0.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(args + ["--switch-penalty", "-1"])


# ---------------------------------------------------------------- through LanguageIdentifier.decide

class LogitsInFirstRow(torch.nn.Module):
    """A stand-in network: each window's logits are the first values of its spectrogram's first row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, :len(LABELS)]


def _identifier() -> LanguageIdentifier:
    cfg = FeatureConfig(window_seconds=1.0, n_mels=8)
    return LanguageIdentifier(LogitsInFirstRow(), {"labels": LABELS, "feature_config": cfg}, torch.device("cpu"))


def _decide(ident: LanguageIdentifier, lp: np.ndarray, speech: np.ndarray, **kw):
    specs = np.zeros((len(lp), 8, 100), np.float32)
    specs[:, 0, :len(LABELS)] = lp
    return ident.decide("f.wav", ident.logprobs(specs), np.arange(len(lp), dtype=float), speech, float(len(lp)), **kw)


def test_a_one_switch_file_with_a_noisy_window_reads_as_two_segments():
    ident = _identifier()
    lp = windows("eeedeeddddd")
    speech = np.ones(len(lp), bool)
    raw = _decide(ident, lp, speech, switch_penalty=0.0)
    assert [s.language for s in merge_segments(raw.segments)] == ["en", "de", "en", "de"]  # as before smoothing
    pred = _decide(ident, lp, speech)
    segs = merge_segments(pred.segments)
    assert [(s.start, s.end, s.language) for s in segs] == [(0.0, 6.0, "en"), (6.0, 11.0, "de")]
    assert pred.segments[3].confidence == pytest.approx(1 - CONFIDENT)  # the window's own probability of en
    for other in (raw, _decide(ident, lp, speech, switch_penalty=10.0)):
        assert (other.language, other.confidence, other.top) == (pred.language, pred.confidence, pred.top)
        assert other.probabilities == pred.probabilities


def test_non_speech_windows_are_skipped_without_breaking_the_path():
    ident = _identifier()
    lp = windows("eeedeeeee")
    lp[4] = windows("d", 0.99)[0]  # silence the network calls confidently German
    speech = np.ones(len(lp), bool)
    speech[4] = False
    pred = _decide(ident, lp, speech)  # the flip at 3 would end a path cut at the silence, and be kept there
    assert [s.start for s in pred.segments] == [0.0, 1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0]
    assert {s.language for s in pred.segments} == {"en"}
    assert _decide(ident, lp[:0], speech[:0]).segments == []
