import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langid.metrics import (
    accuracy_ci,
    aggregate_windows,
    cavg,
    classification_report,
    eer,
    nll,
    per_group_accuracy,
)


# --- aggregate_windows ---------------------------------------------------------------------------

def test_aggregate_windows_hand_example():
    # File "b": windows [.5, .5] and [.8, .2]. Mean log-prob = log of the geometric mean:
    # [sqrt(.4), sqrt(.1)] = sqrt(.1) * [2, 1] -> renormalised [2/3, 1/3].
    # File "a" has one window, so it is returned unchanged. Order is first-seen: b, a.
    w = np.log([[0.5, 0.5], [0.9, 0.1], [0.8, 0.2]])
    ids, out = aggregate_windows(w, ["b", "a", "b"], [True, True, True])
    assert ids == ["b", "a"]
    np.testing.assert_allclose(np.exp(out), [[2 / 3, 1 / 3], [0.9, 0.1]], atol=1e-12)


def test_aggregate_windows_scores_speech_windows_only():
    # "b" as above with a silent window between its two, which does not count; "c" has no speech window, so no
    # score (labeling answers it "unknown"); "a" is unchanged.
    w = np.log([[0.5, 0.5], [0.01, 0.99], [0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    ids, out = aggregate_windows(w, ["b", "b", "a", "b", "c"], [True, False, True, True, False])
    assert ids == ["b", "a", "c"]
    np.testing.assert_allclose(np.exp(out[:2]), [[2 / 3, 1 / 3], [0.9, 0.1]], atol=1e-12)
    assert np.isnan(out[2]).all()


def test_aggregate_windows_rejects_mismatched_ids():
    with pytest.raises(ValueError):
        aggregate_windows(np.zeros((3, 2)), ["a", "b"], [True, True])
    with pytest.raises(ValueError):
        aggregate_windows(np.zeros((3, 2)), ["a", "b", "c"], [True, True])


# --- classification_report -----------------------------------------------------------------------

def test_classification_report_hand_example():
    # true 0 0 0 1 1 2 / pred 0 0 1 1 2 2 -> confusion (rows true):
    #   [2 1 0]
    #   [0 1 1]
    #   [0 0 1]
    # accuracy = 4/6. precision = diag/col sums = 2/2, 1/2, 1/2; recall = diag/row sums = 2/3, 1/2, 1/1.
    # F1 = 2PR/(P+R): en 2*(2/3)/(5/3) = 0.8, fr 0.5, de 2*0.5/1.5 = 2/3; macro = (0.8 + 0.5 + 2/3)/3.
    rep = classification_report([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["en", "fr", "de"])
    assert rep["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert rep["accuracy"] == pytest.approx(4 / 6)
    assert rep["n"] == 6
    expected = {"en": (1.0, 2 / 3, 0.8, 3), "fr": (0.5, 0.5, 0.5, 2), "de": (0.5, 1.0, 2 / 3, 1)}
    for name, (p, r, f, s) in expected.items():
        got = rep["per_language"][name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f))
        assert got["support"] == s
    assert rep["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


@pytest.mark.filterwarnings("error")
def test_classification_report_language_without_trials():
    # "es" never occurs: it still gets a zero row/column and zeros (no warning), and stays out of the macro F1
    # (neither spoken nor answered, it has no F1; an open-set model such as Whisper knows 99 such languages).
    rep = classification_report([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["en", "fr", "de", "es"])
    assert rep["confusion_matrix"][3] == [0, 0, 0, 0]
    assert [row[3] for row in rep["confusion_matrix"]] == [0, 0, 0, 0]
    assert rep["per_language"]["es"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert rep["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # a language answered but never spoken counts, with F1 0: the wrong answers are not hidden
    rep = classification_report([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 3], ["en", "fr", "de", "es"])
    assert rep["per_language"]["es"]["f1"] == 0 and rep["macro_f1"] == pytest.approx(
        np.mean([rep["per_language"][x]["f1"] for x in ("en", "fr", "de", "es")]))


@pytest.mark.filterwarnings("error")
@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5).flatmap(lambda c: st.tuples(
    st.just(c), st.lists(st.tuples(st.integers(0, c - 1), st.integers(0, c - 1)), min_size=1, max_size=40))))
def test_report_accuracy_is_confusion_trace(case):
    n_classes, pairs = case
    y_true, y_pred = zip(*pairs)
    rep = classification_report(list(y_true), list(y_pred), [f"l{i}" for i in range(n_classes)])
    cm = np.array(rep["confusion_matrix"])
    assert cm.sum() == len(pairs)
    assert rep["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())


# --- accuracy_ci ---------------------------------------------------------------------------------

def test_wilson_known_value():
    # 8/10 at 95% (z = 1.95996): centre (0.8 + z²/20)/(1 + z²/10) = 0.7167, half-width 0.2266.
    low, high = accuracy_ci(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_wilson_edges_and_confidence():
    assert accuracy_ci(0, 0) == (0.0, 1.0)
    low, high = accuracy_ci(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # Wilson is not degenerate at p = 0
    assert accuracy_ci(8, 10, 0.99)[0] < accuracy_ci(8, 10, 0.95)[0]  # higher confidence, wider interval


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 10_000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
       st.floats(0.5, 0.999))
def test_wilson_contains_point_estimate(case, confidence):
    correct, total = case
    low, high = accuracy_ci(correct, total, confidence)
    assert 0.0 <= low <= correct / total + 1e-12
    assert correct / total - 1e-12 <= high <= 1.0 + 1e-12


# --- eer -----------------------------------------------------------------------------------------

def test_eer_perfect_and_uninformative():
    assert eer(np.eye(3)[[0, 1, 2, 1]], [0, 1, 2, 1]) == 0.0
    # Constant scores: the ROC is the diagonal, so FNR and FPR cross at 0.5.
    assert eer(np.ones((4, 3)), [0, 1, 2, 0]) == pytest.approx(0.5)


def test_eer_hand_example():
    # Targets (true-language scores): 0.9, 0.5, 0.8. Non-targets: 0.6, 0.1, 0.2, 0.3, 0.05, 0.0.
    # Threshold 0.6: FNR 1/3 (0.5 missed), FPR 1/6 (0.6 accepted). Threshold 0.5: FNR 0, FPR 1/6.
    # FNR - FPR goes +1/6 -> -1/6, crossing half-way, where FNR = FPR = 1/6.
    s = np.array([[0.9, 0.6, 0.1], [0.2, 0.5, 0.3], [0.05, 0.0, 0.8]])
    assert eer(s, [0, 1, 2]) == pytest.approx(1 / 6)


# --- cavg ----------------------------------------------------------------------------------------

def test_cavg_perfect_confident():
    logp = np.log(np.full((4, 3), 0.01) + np.eye(3)[[0, 1, 2, 2]] * 0.97)
    assert cavg(logp, [0, 1, 2, 2]) == 0.0


def test_cavg_two_languages_one_miss():
    # With two languages llr_T = logp_T - logp_other. Trial 2 (true 0, p = [.4, .6]) is a miss for
    # language 0 and a false alarm for language 1:
    # Cavg = mean(0.5 * P_miss(0) = 0.5 * 1/2, 0.5 * P_fa(1, 0) = 0.5 * 1/2) = 0.25.
    p = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.1, 0.9]])
    assert cavg(np.log(p), [0, 0, 1, 1]) == pytest.approx(0.25)
    # A threshold above every llr rejects everything: all misses, no false alarms -> 0.5.
    assert cavg(np.log(p), [0, 0, 1, 1], threshold=100.0) == pytest.approx(0.5)


def test_cavg_uses_llr_not_argmax():
    # Trial 0 (true 0, p = [.5, .45, .05]) is classified correctly, but
    # llr_1 = log(.45 / mean(.5, .05)) = log(.45 / .275) > 0: a false alarm for language 1 on a language-0 trial.
    # P_fa(1, 0) = 1, everything else 0 -> Cavg = (0 + 0.5 / 2 * 1 + 0) / 3 = 1/12.
    p = np.array([[0.5, 0.45, 0.05], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    assert cavg(np.log(p), [0, 1, 2]) == pytest.approx(1 / 12)


def test_cavg_skips_languages_without_trials():
    # Language 2 has no trials. Trial 1 (true 1, p = [.45, .5, .05]): llr_0 = log(.45/.275) > 0, a false alarm.
    # Over the two languages with trials: mean(0.5 * P_fa(0, 1) = 0.5, 0) = 0.25.
    p = np.array([[0.6, 0.3, 0.1], [0.45, 0.5, 0.05]])
    assert cavg(np.log(p), [0, 1]) == pytest.approx(0.25)
    # Only language 0 has trials; one of its two trials is missed: 0.5 * 1/2.
    q = np.array([[0.9, 0.1], [0.3, 0.7]])
    assert cavg(np.log(q), [0, 0]) == pytest.approx(0.25)


def test_cavg_threshold_follows_p_target():
    # p_target = 0.2 -> Bayes threshold log(0.8/0.2) = log 4. The llr log(0.7/0.3) = 0.85 < log 4 becomes a miss.
    p = np.array([[0.7, 0.3], [0.01, 0.99]])
    # Miss on trial 0 for language 0: mean(0.2 * 1, 0) = 0.1.
    assert cavg(np.log(p), [0, 1], p_target=0.2) == pytest.approx(0.1)
    assert cavg(np.log(p), [0, 1]) == 0.0


# --- per_group_accuracy --------------------------------------------------------------------------

def test_per_group_accuracy():
    # s1: trials 0, 2, 3 -> correct, correct, wrong = 2/3; s2: trial 1 wrong = 0.
    out = per_group_accuracy([0, 1, 2, 0], [0, 0, 2, 1], ["s1", "s2", "s1", "s1"])
    assert list(out) == ["s1", "s2"]
    assert out["s1"] == {"n": 3, "accuracy": pytest.approx(2 / 3)}
    assert out["s2"] == {"n": 1, "accuracy": 0.0}
    # numpy keys become plain Python values (JSON-friendly)
    assert list(per_group_accuracy([1], [1], np.array([7]))) == [7]
    assert type(next(iter(per_group_accuracy([1], [1], np.array([7]))))) is int


def test_per_group_accuracy_keeps_first_seen_order_when_groups_interleave():
    """Speakers' trials interleave in a report: the table follows the first-seen order, not Arrow's own."""
    import pyarrow as pa

    rng = np.random.default_rng(0)
    speakers = [f"{rng.integers(0, 2 ** 63):032x}" for _ in range(36)]
    groups = [speakers[i] for i in rng.permutation(np.repeat(np.arange(36), 3))]
    seen = list(dict.fromkeys(groups))
    arrow = pa.table({"g": groups}).group_by("g", use_threads=False).aggregate([]).column("g").to_pylist()
    assert arrow != seen  # the premise: Arrow orders these groups its own way
    out = per_group_accuracy([0] * len(groups), [0] * len(groups), groups)
    assert list(out) == seen and all(v == {"n": 3, "accuracy": 1.0} for v in out.values())


# --- temperature ---------------------------------------------------------------------------------

def test_fit_temperature_recovers_a_known_temperature():
    """Labels drawn from softmax(z / 3) make T = 3 the maximum-likelihood temperature for logits z."""
    from langid.metrics import fit_temperature

    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, size=(20000, 3))
    p = np.exp(z / 3) / np.exp(z / 3).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    assert abs(fit_temperature(z, y) - 3.0) < 0.15
    # confident and right: sharpening (T < 1) lowers the NLL
    assert fit_temperature(np.array([[2.0, 0.0], [0.0, 2.0]] * 50), np.array([0, 1] * 50)) < 0.2


def test_nll_hand_example():
    # logits [0, log 3]: softmax [1/4, 3/4]; true classes 1 and 0 -> NLL mean(-log 3/4, -log 1/4) = log(16/3) / 2.
    # At temperature 2 the logits halve: [0, log 3 / 2] -> p = [1, sqrt 3] / (1 + sqrt 3).
    logits, y = np.array([[0.0, np.log(3)]] * 2), [1, 0]
    assert nll(logits, y) == pytest.approx(np.log(16 / 3) / 2)
    assert nll(logits, y, 2.0) == pytest.approx(np.log(1 + np.sqrt(3)) - np.log(np.sqrt(3)) / 2)
