#!/usr/bin/env python
"""Real voices: langid's models on Common Voice speakers that no model saw in training.

    python benchmarks/realspeech.py [--languages en,de,es] [--synthetic DEMO/corpus] [--demo-model DEMO/model]

Data: ../shared/data/commonvoice (Common Voice 6.1 read sentences, 100 clips per language, speaker ids). About 30%
of the speakers of each language (a hash of the speaker id decides) and all their clips are the test set; the
other speakers are split again by speaker into train and valid (20%) by preprocessing, as for any manifest.

Each configuration is trained by langid's own jobs (`run_preprocess`, `run_training`) and scored by `evaluate` on
the test speakers (accuracy with its 95% Wilson interval, macro F1); speed is `load_model(...).predict_many` over
the test clips in this process, decoding included, on 2 threads.

- whisper:base zero-shot: Whisper's language detection, answers among the benchmark's languages; nothing trained.
- resnet18 on log-mel, real clips only: the demo's recipe (3-s windows, staged schedule, random initialisation).
- the same plus the synthetic corpus (--synthetic, e.g. the demo's espeak-ng corpus) in the training split.
- mlp on Whisper-base encoder embeddings (a frozen pretrained front-end), trained on the true labels.
- the same front-end, trained on whisper:base's answers instead of the true labels (distilled; no labels needed).
- the demo model (--demo-model), on the same test clips.

The best trained model is copied to benchmarks/results/realspeech/model.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, facts_line, machine_facts, markdown_table, write_results  # noqa: E402

from langid.config import FeatureConfig, TrainConfig, default_schedule  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")
TEST_SHARE = 0.3  # of each language's speakers
LOGMEL = FeatureConfig(window_seconds=3.0)  # the demo's features
LOGMEL_SCHEDULE = dict(arch="resnet18", stages=default_schedule((1, 8, 1), (1e-2, 5e-3, 1e-4)), batch_size=16)
MLP_SCHEDULE = dict(arch="mlp", stages=default_schedule((3, 12, 3), (1e-2, 3e-3, 1e-4)), batch_size=32)


def is_test_speaker(speaker: str) -> bool:
    return int(hashlib.sha1(speaker.encode()).hexdigest(), 16) % 1000 < TEST_SHARE * 1000


def write_manifest(path: str, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "language", "speaker", "split"])
        w.writeheader()
        w.writerows(rows)
    return path


def clips(commonvoice: str, languages: list[str]) -> list[dict]:
    """Manifest rows: test speakers in split 'test', the others left to preprocessing's speaker-grouped split."""
    with open(os.path.join(commonvoice, "manifest.tsv"), newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["language"] in languages]
    return [{"path": os.path.join(commonvoice, r["file"]), "language": r["language"],
             "speaker": f"{r['language']}/{r['speaker']}",
             "split": "test" if is_test_speaker(r["speaker"]) else ""} for r in rows]


def preprocess(manifest: str, store: str, cfg: FeatureConfig, **kw) -> None:
    from langid.preprocess import run_preprocess

    res = run_preprocess(manifest, store, cfg, progress=False, **kw)
    print(f"  {store}: {res.summary()}", flush=True)


def train(store: str, output: str, schedule: dict) -> dict:
    from langid.training import run_training

    if os.path.exists(os.path.join(output, "model.json")):
        return json.load(open(os.path.join(output, "model.json")))
    t0 = time.time()
    run_training(TrainConfig(store=store, output=output, workers=1, cpus_per_worker=2, max_failures=0, **schedule),
                 pretrained=False, log=lambda *_: None)
    print(f"  trained {output} in {time.time() - t0:.0f} s", flush=True)
    return json.load(open(os.path.join(output, "model.json")))


def score(name: str, model: str, store: str, out: str, test_files: list[str], languages: list[str],
          restrict: bool = False) -> dict:
    """evaluate's figures on the test speakers, and this process's seconds per clip over the same clips."""
    from langid.evaluation import evaluate
    from langid.inference import load_model

    r = evaluate(model, store, out, "test", progress=False, languages=languages if restrict else None)
    ident = load_model(model, device="cpu", threads=2)
    t0 = time.perf_counter()
    ident.predict_many(test_files, languages=languages if restrict else None)
    per_clip = (time.perf_counter() - t0) / len(test_files)
    low, high = r["accuracy_ci95"]
    row = {"configuration": name, "files": r["files"], "accuracy": round(r["accuracy"], 4),
           "ci95": f"{low:.3f}–{high:.3f}", "macro_f1": round(r["macro_f1"], 4), "s_per_clip": round(per_clip, 4),
           "model": model}
    print(f"  {name}: accuracy {r['accuracy']:.4f} ({low:.3f}-{high:.3f}) on {r['files']} clips, "
          f"{per_clip * 1000:.0f} ms/clip", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=SHARED, help="the shared data folder (default: ../shared/data)")
    ap.add_argument("--languages", default="en,de,es", help="languages to train and test on (default %(default)s)")
    ap.add_argument("--synthetic", help="a Kaggle-layout synthetic corpus to add to training (e.g. DEMO/corpus)")
    ap.add_argument("--demo-model", help="a model folder to score on the same test speakers (e.g. DEMO/model)")
    ap.add_argument("--work", default="/tmp/langid-bench-realspeech", help="stores and models (kept between runs)")
    a = ap.parse_args()

    from langid.runtime import init_ray, quiet_ray_data
    from langid.whisper import feature_config

    commonvoice = os.path.join(a.shared, "commonvoice")
    if not os.path.exists(os.path.join(commonvoice, "manifest.tsv")):
        print(f"no {commonvoice}/manifest.tsv: this benchmark needs the shared Common Voice clips")
        return 2
    languages = a.languages.split(",")
    os.makedirs(a.work, exist_ok=True)
    init_ray(num_cpus=2)
    quiet_ray_data()
    w = lambda *p: os.path.join(a.work, *p)  # noqa: E731
    rows = clips(commonvoice, languages)
    truth = write_manifest(w("manifest.csv"), rows)
    test_files = [r["path"] for r in rows if r["split"] == "test"]
    n_test_speakers = len({r["speaker"] for r in rows if r["split"] == "test"})
    print(f"{len(rows)} clips, {len(test_files)} of them from {n_test_speakers} held-out test speakers", flush=True)
    encoder = feature_config("whisper-encoder", "base")
    results = []

    preprocess(truth, w("store-whisper-mel"), feature_config("whisper-mel", "base"))
    results.append(score("whisper:base zero-shot (answers among the languages)", "whisper:base",
                         w("store-whisper-mel"), w("eval-zero-shot"), test_files, languages, restrict=True))

    preprocess(truth, w("store-logmel"), LOGMEL)
    train(w("store-logmel"), w("model-logmel-real"), LOGMEL_SCHEDULE)
    results.append(score("resnet18 on log-mel, real clips", w("model-logmel-real"), w("store-logmel"),
                         w("eval-logmel-real"), test_files, languages))

    if a.synthetic:
        preprocess(truth, w("store-logmel-synthetic"), LOGMEL)
        preprocess(a.synthetic, w("store-logmel-synthetic"), LOGMEL, split="train")
        train(w("store-logmel-synthetic"), w("model-logmel-synthetic"), LOGMEL_SCHEDULE)
        results.append(score("resnet18 on log-mel, real + synthetic clips", w("model-logmel-synthetic"),
                             w("store-logmel"), w("eval-logmel-synthetic"), test_files, languages))

    preprocess(truth, w("store-encoder"), encoder)
    train(w("store-encoder"), w("model-encoder"), MLP_SCHEDULE)
    results.append(score("mlp on Whisper-base encoder, true labels", w("model-encoder"), w("store-encoder"),
                         w("eval-encoder"), test_files, languages))

    # distilled: whisper:base's answers replace the true labels of the training speakers (test keeps the truth)
    from langid.inference import load_model

    teacher = load_model("whisper:base", device="cpu", threads=2)
    train_rows = [r for r in rows if r["split"] != "test"]
    answers = teacher.predict_many([r["path"] for r in train_rows], languages=languages)
    agree = sum(p.language == r["language"] for p, r in zip(answers, train_rows)) / len(train_rows)
    print(f"  whisper:base agrees with the true labels on {agree:.3f} of the training clips", flush=True)
    distilled = [{**r, "language": p.language} for p, r in zip(answers, train_rows)] + \
                [r for r in rows if r["split"] == "test"]
    preprocess(write_manifest(w("manifest-distilled.csv"), distilled), w("store-encoder-distilled"), encoder)
    train(w("store-encoder-distilled"), w("model-encoder-distilled"), MLP_SCHEDULE)
    results.append(score("mlp on Whisper-base encoder, whisper:base's labels", w("model-encoder-distilled"),
                         w("store-encoder"), w("eval-encoder-distilled"), test_files, languages))

    if a.demo_model:
        from langid.artifact import read_metadata

        cfg = read_metadata(a.demo_model)["feature_config"]
        test_manifest = write_manifest(w("manifest-test.csv"), [r for r in rows if r["split"] == "test"])
        preprocess(test_manifest, w("store-demo-features"), cfg)
        results.append(score("demo model (espeak-ng voices)", a.demo_model, w("store-demo-features"),
                             w("eval-demo"), test_files, languages))

    trained = [r for r in results if not r["model"].startswith("whisper:") and r["model"] != a.demo_model]
    best = max(trained, key=lambda r: r["accuracy"])
    target = RESULTS_DIR / "realspeech" / "model"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(best["model"], target, ignore=shutil.ignore_patterns("ray", "stages"))
    facts = machine_facts(languages=a.languages, clips=len(rows), test_clips=len(test_files),
                          test_speakers=n_test_speakers, teacher_agreement_on_train=round(agree, 4))
    table = markdown_table(results, [("configuration", "configuration"), ("files", "test clips"),
                                     ("accuracy", "accuracy"), ("ci95", "95% CI"), ("macro_f1", "macro F1"),
                                     ("s_per_clip", "s per clip")])
    md, js = write_results("realspeech", f"{table}\n\nbest trained: {best['configuration']} -> {target}\n\n"
                           f"{facts_line(facts)}", {"facts": facts, "results": results, "best": best["configuration"]})
    print(table)
    print(f"best trained model: {best['configuration']} ({best['accuracy']:.4f}), copied to {target}; {md}, {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
