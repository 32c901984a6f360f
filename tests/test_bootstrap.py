"""The bootstrap chain end to end: Whisper labels an unlabelled archive, its confident answers become a store,
a model of our own trains on them and then labels the whole archive itself.

The archive is speech in two languages (en, es: Whisper knows even espeak's well) in folders that stand for
speakers, plus a broken and a silent file. Whisper's answers are checked against the clips' true languages, since
it is the teacher the chain relies on; the students are checked for structure and bookkeeping (a ResNet from
random initialisation learns little from a dozen clips), except the mlp on Whisper's encoder embeddings, which
separates en from es easily and must. Speech: tests/support/speech.py (Common Voice where ../shared has it).
"""
from __future__ import annotations

import csv
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import write_wav
from langid.config import FeatureConfig
from langid.labeling import LabelOptions, LabelResult, run_label
from langid.preprocess import run_preprocess
from langid.sources import ANSWERED_UNKNOWN, LABEL_FAILED, LOW_CONFIDENCE, ManifestOptions
from langid.store import ERRORS, WINDOWS, Store
from langid.training import TrainConfig, default_schedule, run_training
from support.speech import RATE, real_speech_available, speech

pytestmark = pytest.mark.slow

LANGS = ("en", "es")
FOLDERS = 4  # per language: speakers of two clips each
CLIPS_PER_FOLDER = 2
MIN_CONFIDENCE = 0.5
MANIFEST = ManifestOptions(min_confidence=MIN_CONFIDENCE, group_by="folder")
LOGMEL = FeatureConfig(window_seconds=3.0, n_mels=32)  # test_training's bands, windows of the demo recipe
TEACHER_AGREEMENT = 0.9  # Whisper's answers that must be the clips' true language
FRONTEND_ACCURACY = 0.8  # the mlp on encoder embeddings, against the true languages
FRESH_SEEDS = range(8, 12)  # speech() seeds of clips not in the archive (it has 0-7 of each language)


@dataclass
class Archive:
    base: Path  # the module's folder: archive, labels, stores, models
    root: Path  # the archive
    truth: dict  # speech clip path -> its true language
    broken: str
    silent: str
    labels: Path  # Whisper's label CSV
    result: LabelResult
    rows: dict  # path -> Whisper's row

    @property
    def files(self) -> set:
        return set(self.truth) | {self.broken, self.silent}

    def kept(self) -> dict:
        """The rows a store made with MANIFEST holds: answered, known, confident enough; path -> language."""
        return {p: r["language"] for p, r in self.rows.items()
                if r["status"] == "ok" and r["language"] not in ("", "unknown")
                and float(r["confidence"]) >= MIN_CONFIDENCE}


@contextmanager
def timed(step: str):
    """Says how long a step took (seen with -s): where the file's minutes go."""
    t0 = time.perf_counter()
    yield
    print(f"\n  {step}: {time.perf_counter() - t0:.1f} s", flush=True)


def read_rows(path: Path) -> dict:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len({r["path"] for r in rows}) == len(rows), "a file has two rows"
    return {r["path"]: r for r in rows}


def accuracy(answers: dict, truth: dict) -> float:
    return sum(answers.get(p) == lang for p, lang in truth.items()) / len(truth)


def build_archive(root: Path) -> tuple[dict, str, str]:
    """Speech clips of 4-6 s in folders spk0..spk7 (languages alternate; names say nothing of them), a broken file
    and a silent one among them: ({clip: language}, broken, silent)."""
    truth = {}
    for f in range(FOLDERS * len(LANGS)):
        lang = LANGS[f % len(LANGS)]
        for c in range(CLIPS_PER_FOLDER):
            k = (f // len(LANGS)) * CLIPS_PER_FOLDER + c  # the clip's number within its language: its seed
            path = write_wav(root / f"spk{f}" / f"clip{c}.wav", speech(lang, 4.0 + 0.3 * k, seed=k), RATE)
            truth[str(path)] = lang
    broken = root / "spk0" / "broken.wav"
    broken.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt this is no audio at all")
    silent = write_wav(root / "spk1" / "silence.wav", np.zeros(5 * RATE, np.float32), RATE)
    return truth, str(broken), str(silent)


@pytest.fixture(scope="module")
def archive(ray_local, tmp_path_factory) -> Archive:
    """The archive, labelled once by whisper:base among en and es."""
    base = tmp_path_factory.mktemp("bootstrap")
    root = base / "archive"
    with timed("the archive's speech"):
        truth, broken, silent = build_archive(root)
    labels = base / "labels.csv"
    with timed("whisper:base labels the archive"):
        result = run_label("whisper:base", str(root), str(labels), LabelOptions(languages=list(LANGS)), progress=False)
    return Archive(base, root, truth, broken, silent, labels, result, read_rows(labels))


@pytest.fixture(scope="module")
def logmel_store(archive):
    """Whisper's confident answers preprocessed into log-mel windows: (store, PreprocessResult)."""
    store = archive.base / "store-logmel"
    with timed("preprocess log-mel"):
        res = run_preprocess(str(archive.labels), str(store), LOGMEL, manifest=MANIFEST, progress=False)
    return store, res


@pytest.fixture(scope="module")
def encoder_store(archive):
    """The same answers as Whisper-base encoder embeddings (10-s windows: one per clip): (store, result)."""
    from langid.whisper import feature_config

    store = archive.base / "store-encoder"
    with timed("preprocess whisper-encoder"):
        res = run_preprocess(str(archive.labels), str(store), feature_config("whisper-encoder", "base", 10.0),
                             manifest=MANIFEST, progress=False)
    return store, res


def check_store(archive: Archive, store: Path, res) -> dict:
    """The store holds exactly the kept rows, under Whisper's language, each folder on one side of the split; the
    summary counts what was left out. Returns {path: split}."""
    kept = archive.kept()
    rows = archive.rows
    left = {LABEL_FAILED: sum(r["status"] != "ok" for r in rows.values()),
            ANSWERED_UNKNOWN: sum(r["status"] == "ok" and r["language"] in ("", "unknown") for r in rows.values())}
    left[LOW_CONFIDENCE] = len(rows) - len(kept) - sum(left.values())
    assert res.left_out == {k: n for k, n in left.items() if n}, res.left_out
    assert left[LABEL_FAILED] == 1 and left[ANSWERED_UNKNOWN] == 1  # the broken and the silent file
    assert f"{sum(left.values())} label rows left out" in res.summary(), res.summary()
    assert (res.files_seen, res.ok, res.failed) == (len(kept), len(kept), 0), res.summary()

    windows = Store(str(store)).read(WINDOWS, columns=["path", "language", "split", "recording_id"])
    assert Store(str(store)).read(ERRORS).num_rows == 0
    paths = windows.column("path").to_pylist()
    assert set(paths) == set(kept) and res.windows == len(paths)
    assert archive.broken not in paths and archive.silent not in paths
    split_of, sides = {}, {}
    for p, lang, split, group in zip(paths, windows.column("language").to_pylist(), windows.column("split").to_pylist(),
                                     windows.column("recording_id").to_pylist()):
        assert lang == kept[p] and group == os.path.dirname(p), (p, lang, group)  # Whisper's answer, by folder
        split_of[p] = split
        sides.setdefault(group, set()).add(split)
    assert all(len(s) == 1 for s in sides.values()), sides  # no folder on both sides
    assert set(split_of.values()) == {"train", "valid"}
    return split_of


# ---------------------------------------------------------------- the chain with a ResNet student

def test_whisper_labels_every_file_and_knows_the_clips(archive):
    rows, res = archive.rows, archive.result
    assert set(rows) == archive.files
    assert (res.total, res.labelled, res.resumed, res.errors) == (len(archive.files), len(archive.files), 0, 1)
    assert res.known == 0  # folder and file names tell no language
    broken = rows[archive.broken]
    assert broken["status"] == "error" and broken["error"] and "\n" not in broken["error"]
    assert (broken["language"], broken["confidence"]) == ("", "")
    silent = rows[archive.silent]
    assert (silent["status"], silent["language"], silent["error"], silent["windows_used"]) == \
        ("ok", "unknown", "no speech found", "0"), silent
    answers = {}
    for p in archive.truth:
        r = rows[p]
        assert r["status"] == "ok" and r["language"] in LANGS and MIN_CONFIDENCE <= float(r["confidence"]) <= 1, r
        assert 4.0 <= float(r["duration"]) <= 6.2 and r["windows"] == "1", r  # one 10-s window
        answers[p] = r["language"]
    agreement = accuracy(answers, archive.truth)
    wrong = {os.path.relpath(p, archive.root): (archive.truth[p], rows[p]["language"], rows[p]["confidence"])
             for p in archive.truth if answers[p] != archive.truth[p]}
    print(f"\nwhisper:base on {len(archive.truth)} {'real' if real_speech_available() else 'espeak-ng'} clips: "
          f"agreement {agreement:.3f}; wrong: {wrong}")
    assert agreement >= TEACHER_AGREEMENT, wrong


def test_bootstrap_chain_trains_a_student_that_labels_the_archive(archive, logmel_store, tmp_path):
    import langid
    from langid.artifact import load_network

    store, res = logmel_store
    check_store(archive, store, res)
    found = sorted(set(archive.kept().values()))
    assert Store(str(store)).read_config() == LOGMEL

    model = tmp_path / "student"
    stages = default_schedule((1, 1, 1), (1e-2, 5e-3, 1e-4))
    with timed("train the resnet18 student"):
        trained = run_training(TrainConfig(store=str(store), output=str(model), arch="resnet18", stages=stages,
                                           batch_size=8, max_failures=0), pretrained=False, log=lambda *_: None)
    assert trained["labels"] == found and trained["output"] == str(model)
    assert [(h["stage"], h["epoch"]) for h in trained["history"]] == [("head", 1), ("unfrozen", 1), ("head-again", 1)]
    _, meta = load_network(str(model))
    assert (meta["labels"], meta["architecture"], meta["feature_config"]) == (found, "resnet18", LOGMEL)
    raw = json.loads((model / "model.json").read_text())
    assert raw["training"]["imagenet_pretrained"] is False and raw["training"]["store"] == str(store)

    # the student labels the whole archive: every file a row, the broken one an error, the silent one unknown
    out = tmp_path / "student.csv"
    with timed("the student labels the archive"):
        result = run_label(str(model), str(archive.root), str(out), LabelOptions(), progress=False)
    rows = read_rows(out)
    assert set(rows) == archive.files
    assert (result.total, result.labelled, result.errors) == (len(archive.files), len(archive.files), 1)
    broken = rows[archive.broken]
    assert broken["status"] == "error" and broken["error"] == archive.rows[archive.broken]["error"]  # decoding's words
    silent = rows[archive.silent]
    assert (silent["status"], silent["language"], silent["error"]) == ("ok", "unknown", "no speech found"), silent
    for p in archive.truth:
        r = rows[p]
        assert r["status"] == "ok" and r["language"] in found and 0 < float(r["confidence"]) <= 1, r
        assert r["windows"] == ("1" if float(r["duration"]) < 4.5 else "2"), r  # 3-s windows, a tail of 1.5 s or more
    ident = langid.load_model(str(model), "cpu")
    print(f"\nthe resnet18 student agrees with the truth on "
          f"{accuracy({p: r['language'] for p, r in rows.items()}, archive.truth):.3f} of the clips (not asserted), "
          f"with whisper on {accuracy({p: r['language'] for p, r in rows.items()}, archive.kept()):.3f}")
    assert ident.labels == found


# ---------------------------------------------------------------- the Whisper-encoder front-end with an mlp

def test_whisper_encoder_frontend_student_knows_the_languages(archive, encoder_store, tmp_path):
    import langid
    from langid.evaluation import evaluate

    store, res = encoder_store
    split_of = check_store(archive, store, res)
    cfg = Store(str(store)).read_config()
    assert (cfg.frontend, cfg.whisper, cfg.window_seconds, cfg.shape) == ("whisper-encoder", "base", 10.0, (2, 512))
    assert res.windows == len(archive.kept())  # clips shorter than a window: one each
    found = sorted(set(archive.kept().values()))

    model = tmp_path / "mlp"
    # 12 unfrozen epochs of 3 steps: enough to fit the training folders every time (6 left 2 of 16 clips wrong at
    # worst over 7 runs), so the bar below is not a matter of luck
    stages = default_schedule((2, 12, 2), (1e-2, 3e-3, 1e-4))
    with timed("train the mlp"):
        trained = run_training(TrainConfig(store=str(store), output=str(model), arch="mlp", stages=stages,
                                           batch_size=4, max_failures=0), pretrained=False, log=lambda *_: None)
    assert trained["labels"] == found
    ident = langid.load_model(str(model), "cpu")
    assert ident.meta["architecture"] == "mlp" and ident.labels == found
    assert ident.cfg == cfg and ident.cfg.frontend == "whisper-encoder"  # the model computes the store's embeddings

    # the store's held-out folders, through evaluate (Whisper's answers as the reference)
    with timed("evaluate the mlp"):
        report = evaluate(str(model), str(store), str(tmp_path / "report"), split="valid", progress=False)
    assert report["files"] == sum(s == "valid" for s in split_of.values()) and report["labels"] == found
    assert (tmp_path / "report" / "predictions.csv").exists() and (tmp_path / "report" / "report.md").exists()

    # every clip of the archive from its audio, against the true languages
    clips = sorted(archive.truth)
    with timed("the mlp predicts every file"):
        preds = ident.predict_many(clips + [archive.broken, archive.silent])
    assert [p.path for p in preds] == clips + [archive.broken, archive.silent]
    assert all(p.status == "ok" and p.language in LANGS for p in preds[:-2]), [p.language for p in preds]
    assert preds[-2].status == "error" and preds[-1].language == "unknown"
    answers = dict(zip(clips, (p.language for p in preds)))
    acc = accuracy(answers, archive.truth)
    held_out = {p: archive.truth[p] for p, s in split_of.items() if s == "valid"}
    # and speech no model saw (other Common Voice clips or espeak texts)
    fresh = [(speech(lang, 5.0, seed=s), lang) for lang in LANGS for s in FRESH_SEEDS]
    fresh_acc = np.mean([p.language == lang for p, (_, lang) in
                         zip(ident.predict_many([x for x, _ in fresh], sample_rate=RATE), fresh)])
    print(f"\nmlp on whisper-base encoder ({'real' if real_speech_available() else 'espeak-ng'} speech): accuracy "
          f"{acc:.3f} on all {len(clips)} clips, {accuracy(answers, held_out):.3f} on the {len(held_out)} held-out "
          f"ones, {fresh_acc:.3f} on {len(fresh)} new clips; evaluate on valid (Whisper's labels): "
          f"{report['accuracy']:.3f}; confidences {sorted(round(p.confidence, 3) for p in preds[:-2])}")
    assert acc >= FRONTEND_ACCURACY, {os.path.relpath(p, archive.root): (archive.truth[p], a)
                                      for p, a in answers.items() if a != archive.truth[p]}


def test_training_refuses_an_architecture_for_the_other_features(logmel_store, encoder_store, tmp_path):
    """A ResNet on embeddings, an mlp on log-mel images: refused before any work, the message naming the fix."""
    with pytest.raises(ValueError, match="holds whisper-encoder features: train --arch mlp on them"):
        run_training(TrainConfig(store=str(encoder_store[0]), output=str(tmp_path / "a"), arch="resnet18",
                                 batch_size=8, max_failures=0), pretrained=False)
    with pytest.raises(ValueError, match="holds logmel features: train a ResNet on them "
                                         r"\(--arch mlp needs a store preprocessed with --frontend whisper-encoder"):
        run_training(TrainConfig(store=str(logmel_store[0]), output=str(tmp_path / "b"), arch="mlp",
                                 batch_size=8, max_failures=0), pretrained=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
