"""Evaluation metrics for language identification: pure functions on numpy arrays."""
from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence

import numpy as np


def aggregate_windows(window_logprobs: np.ndarray, file_ids: Sequence[Hashable], speech) -> tuple[list, np.ndarray]:
    """The file score, one rule for labeling and evaluation: the log-softmax of the mean log-probability of the file's
    speech windows; a file without one has none (a row of NaN): labeling answers 'unknown', evaluation leaves it out.

    Returns (file ids in first-seen order, array (n_files, n_classes)).
    """
    w = np.asarray(window_logprobs, dtype=np.float64)
    speech = np.asarray(speech, dtype=bool)
    if w.ndim != 2 or not len(w) == len(file_ids) == len(speech):
        raise ValueError(f"expected (n_windows, n_classes) with {len(file_ids)} rows and as many speech flags, "
                         f"got {w.shape} and {speech.shape}")
    index: dict = {}
    inverse = np.array([index.setdefault(f, len(index)) for f in file_ids], dtype=np.int64)[speech]
    sums = np.zeros((len(index), w.shape[1]))
    np.add.at(sums, inverse, w[speech])
    counts = np.bincount(inverse, minlength=len(index))[:, None]
    mean = np.divide(sums, counts, out=np.full_like(sums, np.nan), where=counts > 0)
    return list(index), mean - np.logaddexp.reduce(mean, axis=1, keepdims=True)


def classification_report(y_true, y_pred, labels: list[str]) -> dict:
    """Accuracy, per-language precision/recall/F1/support, macro F1 (over languages spoken or answered) and confusion
    matrix (rows true, cols predicted)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    ids = list(range(len(labels)))
    with warnings.catch_warnings():
        # sklearn warns about a single observed label even when `labels` is given, which is exactly the fix it asks for
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
        cm = confusion_matrix(y_true, y_pred, labels=ids)
    n = int(len(y_true))
    return {
        "n": n,
        "accuracy": float(np.mean(y_true == y_pred)) if n else float("nan"),
        # over the languages that occur, as truth or as answer: one neither spoken nor answered has no F1 (sklearn's
        # 0 for it would put 96 zeros into Whisper's macro F1 on a 3-language test set)
        "macro_f1": float(np.mean(f[(s > 0) | (np.bincount(y_pred, minlength=len(ids))[:len(ids)] > 0)])) if n else float("nan"),
        "per_language": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(labels)
        },
        "labels": list(labels),
        "confusion_matrix": cm.tolist(),
    }


def accuracy_ci(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there are no trials."""
    from scipy.stats import binomtest

    if total <= 0:
        return 0.0, 1.0
    ci = binomtest(correct, total).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def eer(scores: np.ndarray, y_true) -> float:
    """Equal error rate, pooled one-vs-rest: targets are each trial's true-language score, non-targets the rest.

    The FNR and FPR curves from the ROC are linearly interpolated to the point where they cross.
    """
    from sklearn.metrics import roc_curve

    scores = np.asarray(scores, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    is_target = np.zeros(scores.shape, dtype=bool)
    is_target[np.arange(len(y_true)), y_true] = True
    if is_target.all() or not is_target.any():
        raise ValueError("EER needs both target and non-target trials")
    fpr, tpr, _ = roc_curve(is_target.ravel(), scores.ravel(), drop_intermediate=False)
    fnr = 1.0 - tpr
    diff = fnr - fpr  # non-increasing from +1 to -1 along the ROC
    i = int(np.argmax(diff <= 0))
    if diff[i] == 0:
        return float(fpr[i])
    t = diff[i - 1] / (diff[i - 1] - diff[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def detection_llrs(logprobs: np.ndarray) -> np.ndarray:
    """Per-language log-likelihood ratios: logp_T - log(mean over j != T of p_j), shape (n, C)."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    n_classes = logprobs.shape[1]
    from scipy.special import logsumexp

    others = np.stack([logsumexp(np.delete(logprobs, t, axis=1), axis=1) for t in range(n_classes)], axis=1)
    return logprobs - (others - np.log(n_classes - 1))


def cavg(logprobs: np.ndarray, y_true, p_target: float = 0.5, threshold: float | None = None) -> float:
    """NIST LRE average detection cost.

    Detection scores are log-likelihood ratios under uniform priors,
    llr_T = logp_T - log(mean over j != T of exp(logp_j)); a trial is accepted for L_T when llr_T >= threshold,
    which defaults to the Bayes threshold log(C_fa * (1 - p_target) / (C_miss * p_target)) with C_miss = C_fa = 1
    (0 for p_target = 0.5). With P_miss(L_T) the fraction of L_T trials rejected for L_T and P_fa(L_T, L_N) the
    fraction of L_N trials accepted for L_T,
        Cavg = mean over L_T of [p_target * P_miss(L_T) + (1 - p_target) / (K - 1) * sum_{L_N != L_T} P_fa(L_T, L_N)]
    where languages without trials are skipped (as L_T and L_N) and K counts the languages with trials; with a
    single such language only its miss term remains.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    if threshold is None:
        threshold = float(np.log((1 - p_target) / p_target))
    accept = detection_llrs(logprobs) >= threshold
    present = [c for c in range(accept.shape[1]) if np.any(y_true == c)]
    if not present:
        raise ValueError("Cavg needs at least one trial")
    costs = []
    for t in present:
        p_miss = 1.0 - accept[y_true == t, t].mean()
        p_fa = [accept[y_true == n, t].mean() for n in present if n != t]
        fa_term = (1 - p_target) * float(np.mean(p_fa)) if p_fa else 0.0
        costs.append(p_target * p_miss + fa_term)
    return float(np.mean(costs))


def per_group_accuracy(y_true, y_pred, groups: Sequence[Hashable]) -> dict:
    """{group: {"n": trials, "accuracy": fraction correct}} in first-seen group order (e.g. per speaker)."""
    import pyarrow as pa

    trials = pa.table({"group": pa.array(groups), "correct": np.asarray(y_true) == np.asarray(y_pred)})
    counts = trials.group_by("group", use_threads=False).aggregate([("correct", "count"), ("correct", "mean")])
    columns = (counts.column(name).to_pylist() for name in ("group", "correct_count", "correct_mean"))
    found = {g: {"n": n, "accuracy": a} for g, n, a in zip(*columns)}
    return {g: found[g] for g in dict.fromkeys(trials.column("group").to_pylist())}  # Arrow's group order is its own


def nll(logits: np.ndarray, y_true, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes under softmax(logits / temperature)."""
    y = np.asarray(y_true)
    from scipy.special import log_softmax

    return float(-log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y_true) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) (Guo et al. 2017), searched over log T."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda log_t: nll(logits, y_true, np.exp(log_t)), bounds=(np.log(0.05), np.log(20.0)),
                          method="bounded")
    return float(np.exp(res.x))
