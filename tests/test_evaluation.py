"""The evaluation job's bookkeeping: evaluate() on a real preprocessed store with small untrained models.

What a model predicts is not under test here (test_training checks that training learns); what is:
one prediction per test file, scored from its speech windows, and metrics, confusion matrix, CSV
files and report that agree with those predictions and with each other.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from conftest import REPO, write_wav
from langid.config import FeatureConfig
from langid.evaluation import evaluate, file_values
from langid.inference import load_model as load_identifier
from langid.artifact import save_model
from langid.model import LangIdNet
from langid.store import WINDOWS, Store, StoreError, logmel_matrix

CFG = FeatureConfig(window_seconds=1.0, n_mels=32, hop_length=160)
RATE = 16000
BANDS = {"aa": (150.0, 450.0), "bb": (1200.0, 2000.0), "cc": (4000.0, 6000.0)}
# uneven test counts so that per-class bookkeeping errors change the numbers; aa also has MIXED
TEST_COUNTS = {"aa": 1, "bb": 3, "cc": 4}
LENGTHS = (1.0, 2.0, 3.0)  # test files of 1, 2 and 3 windows
MIXED = "mixed"  # an aa test file: 2 s of sound then 1 s of digital silence (its last window is 'silent')
LABELS = sorted(BANDS)


def band_noise(lo: float, hi: float, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / RATE)
    spec[(f < lo) | (f > hi)] = 0
    x = np.fft.irfft(spec, n)
    return (0.3 * x / np.abs(x).max() + 0.002 * rng.standard_normal(n)).astype(np.float32)


def kaggle_name(lang: str, gender: str, tag: str) -> str:
    return f"{lang}_{gender}_{tag.encode().hex().ljust(32, '0')[:32]}.fragment0.flac"


@pytest.fixture(scope="module")
def store(ray_local, tmp_path_factory):
    """A Kaggle tree (2 training recordings per language; TEST_COUNTS test files + MIXED), preprocessed."""
    from langid.preprocess import run_preprocess

    base = tmp_path_factory.mktemp("evalstore")
    corpus = base / "corpus"
    seed = 0
    for lang, (lo, hi) in BANDS.items():
        for r in range(2):
            seed += 1
            write_wav(corpus / "train" / "train" / kaggle_name(lang, "m", f"{lang}{r}"),
                      band_noise(lo, hi, 2.0, seed), RATE)
        for r in range(TEST_COUNTS[lang]):
            seed += 1
            write_wav(corpus / "test" / "test" / kaggle_name(lang, "f", f"{lang}t{r}"),
                      band_noise(lo, hi, LENGTHS[r % 3], seed), RATE)
    x = np.concatenate([band_noise(*BANDS["aa"], 2.0, 99), np.zeros(RATE, np.float32)])
    write_wav(corpus / "test" / "test" / kaggle_name("aa", "m", MIXED), x, RATE)
    res = run_preprocess(str(corpus), str(base / "store"), CFG, batch_size=4, progress=False)  # several shards
    assert res.failed == 0, res.errors
    return base / "store"


@pytest.fixture(scope="module")
def silent_store(ray_local, tmp_path_factory):
    """A store whose test split holds MIXED, a file silent throughout, a file without silence and a file whose
    source level is below the silence threshold (each language has a training recording too, for `random_model`)."""
    from langid.preprocess import run_preprocess

    corpus = tmp_path_factory.mktemp("silentstore") / "corpus"
    for seed, (lang, (lo, hi)) in enumerate(BANDS.items()):
        write_wav(corpus / "train" / "train" / kaggle_name(lang, "m", lang), band_noise(lo, hi, 2.0, seed), RATE)
    test = corpus / "test" / "test"
    write_wav(test / kaggle_name("aa", "m", MIXED),
              np.concatenate([band_noise(*BANDS["aa"], 2.0, 10), np.zeros(RATE, np.float32)]), RATE)
    write_wav(test / kaggle_name("aa", "f", "silent"), np.zeros(3 * RATE, np.float32), RATE)
    write_wav(test / kaggle_name("bb", "f", "sound"), band_noise(*BANDS["bb"], 2.0, 11), RATE)
    quiet = band_noise(*BANDS["bb"], 2.0, 12)  # at -70 dBFS: each window loud once the level is normalised
    write_wav(test / kaggle_name("bb", "m", "quiet"), quiet * 10 ** (-70 / 20) / np.sqrt(np.mean(quiet ** 2)), RATE)
    res = run_preprocess(str(corpus), str(corpus.parent / "store"), CFG, progress=False)
    assert res.failed == 0, res.errors
    return corpus.parent / "store", sorted(test.iterdir())


def split_windows(store_dir: Path, split: str = "test") -> pd.DataFrame:
    table = Store(str(store_dir)).read(WINDOWS, filters=pc.field("split") == split)
    df = table.drop_columns(["logmel"]).to_pandas()
    df["spec"] = list(logmel_matrix(table))
    return df



_NETS: dict = {}


def random_model(store_dir: Path, folder: Path, labels=LABELS, cfg=CFG) -> Path:
    """An untrained LangIdNet saved as a model folder, with outputs that differ between inputs: BatchNorm
    statistics of the store's training windows and a larger random last layer (one net per class count)."""
    model = _NETS.get(len(labels))
    if model is None:
        torch.manual_seed(len(labels))
        model = LangIdNet("resnet18", len(labels))
        specs = np.stack(split_windows(store_dir, "train").spec.to_list())
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # running statistics = this batch's statistics
        model.train()
        with torch.no_grad():
            model(torch.from_numpy(specs)[:, None])
            last = model.head[-1]
            last.weight.copy_(torch.randn(last.weight.shape) * 0.5)
        _NETS[len(labels)] = model.eval()
    save_model(model, str(folder), list(labels), cfg)
    return folder


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_evaluate_outputs_agree_with_each_other_and_the_store(store, tmp_path):
    model_dir = random_model(store, tmp_path / "model")
    out = tmp_path / "report"
    result = evaluate(str(model_dir), str(store), str(out), progress=False)
    for name in ("metrics.json", "predictions.csv", "confusion_matrix.csv", "confusion_matrix.png", "report.md"):
        assert (out / name).is_file(), name
    assert not (out / "training_curves.png").exists()  # the model folder has none

    windows = split_windows(store)
    test_paths = set(windows.path)
    n = len(test_paths)
    assert n == sum(TEST_COUNTS.values()) + 1

    # predictions.csv: one row per test file of the store, with its true language
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns) == ["path", "speaker", "language", "predicted", "confidence",
                                  *[f"p_{x}" for x in LABELS]]
    assert len(pred) == n and set(pred.path) == test_paths
    truth = windows.groupby("path").language.first()
    assert (pred.language == pred.path.map(truth)).all()
    assert (pred.speaker == pred.path.map(windows.groupby("path").speaker.first())).all()
    probs = pred[[f"p_{x}" for x in LABELS]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (pred.predicted == [LABELS[i] for i in probs.argmax(axis=1)]).all()
    np.testing.assert_allclose(pred.confidence, probs.max(axis=1), atol=1e-6)

    # each file's probabilities: the mean window log-probability over its speech windows, from the store
    ident = load_identifier(str(model_dir), device="cpu")
    silent_seen = False
    for path, rows in windows.groupby("path"):
        speech = ~rows.quality_flags.fillna("").str.contains("silent")
        lp = ident.logprobs(np.stack(rows.spec.to_list()))
        used = lp[speech.to_numpy()] if speech.any() else lp
        mean = used.mean(axis=0)
        want = np.exp(mean - np.logaddexp.reduce(mean))
        got = probs[pred.index[pred.path == path][0]]
        # float32 convolutions differ in the last digits with the batch they run in (evaluate batches across files)
        np.testing.assert_allclose(got, want, atol=5e-5, err_msg=path)
        if MIXED.encode().hex()[:8] in path:
            assert speech.tolist() == [True, True, False]  # the test's premise: one silent window
            everything = lp.mean(axis=0)
            # compared in log space: a saturated softmax can hide the difference in probabilities
            with_silent = everything - np.logaddexp.reduce(everything)
            assert np.abs(with_silent - (mean - np.logaddexp.reduce(mean))).max() > 1e-4
            silent_seen = True
    assert silent_seen

    # metrics.json agrees with predictions.csv
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    correct = int((pred.language == pred.predicted).sum())
    assert metrics["files"] == n and metrics["split"] == "test" and metrics["labels"] == LABELS
    assert metrics["accuracy"] == pytest.approx(correct / n, abs=1e-12)
    low, high = metrics["accuracy_ci95"]
    assert (low, high) == pytest.approx(wilson(correct, n), abs=1e-9)
    assert low <= metrics["accuracy"] <= high
    for lang in LABELS:
        m = metrics["per_language"][lang]
        assert m["support"] == int((pred.language == lang).sum())
        tp = int(((pred.language == lang) & (pred.predicted == lang)).sum())
        assert m["recall"] == pytest.approx(tp / m["support"])
    per_speaker = pred.assign(ok=pred.language == pred.predicted).groupby("speaker").ok.agg(["size", "mean"])
    assert {s: (v["n"], v["accuracy"]) for s, v in metrics["per_speaker"].items()} == \
        {s: (int(r["size"]), pytest.approx(r["mean"])) for s, r in per_speaker.iterrows()}

    # the confusion matrix: counts of (true, predicted) pairs, rows true, summing to the number of files
    rows = read_csv(out / "confusion_matrix.csv")
    assert rows[0][1:] == LABELS and [r[0] for r in rows[1:]] == LABELS
    cm = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    assert cm.sum() == n == len(pred)
    crosstab = pd.crosstab(pred.language, pred.predicted).reindex(index=LABELS, columns=LABELS, fill_value=0)
    np.testing.assert_array_equal(cm, crosstab.to_numpy())
    assert metrics["confusion_matrix"] == cm.tolist()
    assert np.trace(cm) == correct
    assert (out / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # the report's accuracy row gives the accuracy and its interval
    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| accuracy |"))
    assert all(f"{x:.4f}" in row for x in (metrics["accuracy"], low, high))
    assert "confusion_matrix.png" in report and f"{n} files" in report


def test_a_constant_model_gives_the_expected_numbers(store, tmp_path):
    """With the last layer zeroed every file is a three-way tie, which argmax resolves to the first label."""
    torch.manual_seed(0)
    model = LangIdNet("resnet18", 3).eval()
    with torch.no_grad():
        model.head[-1].weight.zero_()
    save_model(model, str(tmp_path / "model"), LABELS, CFG)
    r = evaluate(str(tmp_path / "model"), str(store), str(tmp_path / "report"), progress=False)

    counts = {"aa": TEST_COUNTS["aa"] + 1, "bb": TEST_COUNTS["bb"], "cc": TEST_COUNTS["cc"]}
    n = sum(counts.values())
    assert r["files"] == n
    assert r["accuracy"] == counts["aa"] / n
    assert r["confusion_matrix"] == [[counts["aa"], 0, 0], [counts["bb"], 0, 0], [counts["cc"], 0, 0]]
    assert r["accuracy_ci95"] == pytest.approx(list(wilson(counts["aa"], n)), abs=1e-9)
    assert r["per_language"]["aa"] == {"precision": pytest.approx(counts["aa"] / n), "recall": 1.0,
                                       "f1": pytest.approx(2 * counts["aa"] / (n + counts["aa"])),
                                       "support": counts["aa"]}
    assert r["per_language"]["bb"]["recall"] == 0.0 and r["per_language"]["cc"]["support"] == counts["cc"]
    pred = pd.read_csv(tmp_path / "report" / "predictions.csv")
    assert (pred.predicted == "aa").all()
    np.testing.assert_allclose(pred[["p_aa", "p_bb", "p_cc"]].to_numpy(), 1 / 3, atol=1e-6)
    assert r["cavg"] == pytest.approx(0.5)  # every LLR is 0: always accepted, so only false alarms, 0.5 each


def test_languages_the_model_does_not_know_are_left_out(store, tmp_path):
    model_dir = random_model(store, tmp_path / "model", labels=["aa", "cc"])
    out = tmp_path / "report"
    r = evaluate(str(model_dir), str(store), str(out), progress=False)
    n = TEST_COUNTS["aa"] + 1 + TEST_COUNTS["cc"]
    assert r["files"] == n and r["languages_not_in_model"] == ["bb"] and r["labels"] == ["aa", "cc"]
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == n and set(pred.language) == {"aa", "cc"}
    assert sum(map(sum, r["confusion_matrix"])) == n
    assert r["accuracy"] == pytest.approx((pred.language == pred.predicted).mean())
    assert "bb" in (out / "report.md").read_text().split("left out")[-1]


def test_store_with_other_features_is_refused(store, tmp_path):
    other = FeatureConfig(window_seconds=1.0, n_mels=32, hop_length=200)
    model_dir = random_model(store, tmp_path / "model", cfg=other)
    out = tmp_path / "report"
    with pytest.raises(StoreError, match="other features"):
        evaluate(str(model_dir), str(store), str(out), progress=False)
    assert not out.exists()  # refused before anything is written

    with pytest.raises(StoreError, match="not a langid store"):
        evaluate(str(random_model(store, tmp_path / "ok")), str(tmp_path / "no-store"), str(out), progress=False)
    with pytest.raises(StoreError, match="no windows in split 'nope'"):
        evaluate(str(tmp_path / "ok"), str(store), str(out), split="nope", progress=False)


def test_training_curves_are_copied_into_the_report(store, tmp_path):
    from langid.plots import training_curves_png

    model_dir = random_model(store, tmp_path / "model")
    history = [{"stage": "head", "epoch": 1, "train_loss": 1.0, "valid_loss": 1.1, "accuracy": 0.4, "lr": 1e-2},
               {"stage": "unfrozen", "epoch": 1, "train_loss": 0.5, "valid_loss": 0.6, "accuracy": 0.8, "lr": 1e-3}]
    training_curves_png(history, model_dir / "training_curves.png")
    out = tmp_path / "report"
    r = evaluate(str(model_dir), str(store), str(out), split="valid", progress=False)
    assert (out / "training_curves.png").read_bytes() == (model_dir / "training_curves.png").read_bytes()
    assert "![training curves](training_curves.png)" in (out / "report.md").read_text()
    assert r["split"] == "valid" and r["files"] == len(set(split_windows(store, "valid").path)) == 3


def test_evaluate_job_command_line(store, tmp_path):
    model_dir = random_model(store, tmp_path / "model")
    out = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--model", str(model_dir), "--store", str(store),
           "--output", str(out), "--quiet"]
    r = subprocess.run(job, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(fact in r.stdout for fact in (f"{metrics['files']} files", f"{metrics['accuracy']:.4f}",
                                              str(out / "report.md")))


def test_labeling_and_evaluation_answer_alike_for_files_with_silence(silent_store, tmp_path):
    """One file score for both: the same language and probabilities from the speech windows, and for a file with
    none, labeling's 'unknown' where evaluation leaves the file out."""
    store, files = silent_store
    model_dir = random_model(store, tmp_path / "model")
    r = evaluate(str(model_dir), str(store), str(tmp_path / "report"), progress=False)
    evaluated = pd.read_csv(tmp_path / "report" / "predictions.csv").set_index("path")
    flags = split_windows(store).groupby("path").quality_flags
    windows, silent = flags.size(), flags.agg(lambda f: int(f.fillna("").str.contains("silent").sum()))
    assert sorted((silent / windows).tolist()) == [0, 1 / 3, 1, 1]  # the premise: no, one and every window silent
    labelled = load_identifier(str(model_dir), device="cpu").predict_many(files)
    for path, label in zip(files, labelled):
        key = next(k for k in windows.index if k.endswith(path.name))
        assert (label.windows, label.windows_used) == (windows[key], windows[key] - silent[key])
        if silent[key] == windows[key]:
            assert (label.language, label.error) == ("unknown", "no speech found")
            assert key in r["files_without_speech"] and key not in evaluated.index
            continue
        row = evaluated.loc[key]
        assert label.language == row.predicted
        got = row[[f"p_{x}" for x in LABELS]].to_numpy(float)
        np.testing.assert_allclose([label.probabilities[x] for x in LABELS], got, atol=5e-5, err_msg=key)
    assert r["files"] == len(evaluated) == 2 and len(r["files_without_speech"]) == 2 and "without speech" in (tmp_path / "report" / "report.md").read_text()


def test_file_values_follow_the_files_order_whatever_arrow_groups():
    """A file's language and speaker are its own when its windows lie apart in the store (as in the demo's
    store): Arrow's groups then come in an order of their own, which once gave files each other's languages."""
    rng = np.random.default_rng(0)
    names = [f"corpus/{'aa' if i % 2 else 'bb'}_m_{rng.integers(0, 2 ** 63):032x}.fragment{i}.flac" for i in range(36)]
    order = rng.permutation(np.repeat(np.arange(36), 3))
    paths = [names[i] for i in order]
    windows = pa.table({"path": paths, "language": [p.split("/")[1][:2] for p in paths],
                        "speaker": [p.split("_")[2][:8] for p in paths]})
    files = list(dict.fromkeys(paths))  # first-seen, as aggregate_windows orders them
    grouped = windows.group_by("path", use_threads=False).aggregate([("language", "first")])
    assert grouped.column("path").to_pylist() != files  # the premise: Arrow's order is not the files' order
    languages, speakers = file_values(windows, files, ("language", "speaker"))
    assert languages == [f.split("/")[1][:2] for f in files]
    assert speakers == [f.split("_")[2][:8] for f in files]
