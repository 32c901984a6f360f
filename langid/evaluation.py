"""The evaluation job: a model on a labelled store split -> metrics, confusion matrix, report; and the accuracy of
labels on the files whose names tell their language."""
from __future__ import annotations

import csv
import json
import os
import shutil
from typing import Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from langid import metrics
from langid.inference import LanguageIdentifier, load_model, restrict
from langid.inputs import MEMBER_SEP
from langid.store import WINDOWS, Store, StoreError, logmel_matrix
from langid.uris import StagedFolder, local_folder


def score_store(ident: LanguageIdentifier, store_uri: str, split: str = "test", batch_size: Optional[int] = None,
                progress: bool = True, candidates: Optional[list] = None):
    """Per-file (paths, languages, speakers, scores) for a split, read one shard at a time; with `candidates` (label
    indices), each window is renormalised over them first, as labeling does.

    The scores are labeling's (metrics.aggregate_windows), NaN for a file without speech. A window is speech unless
    its quality flags say 'silent'; the store gives every window its file's flags too, so a file whose source level
    is below the silence level has no speech window."""
    from tqdm.auto import tqdm

    store = Store(store_uri)
    if store.read_config() != ident.cfg:
        hint = (f"--frontend whisper-mel:{ident.cfg.whisper} --window-seconds {ident.cfg.window_seconds:g}"
                if ident.cfg.frontend == "whisper-mel" else "the model's settings (model.json: feature_config)")
        raise StoreError(f"{store_uri} was preprocessed with other features than the model's; "
                         f"preprocess again with {hint}")
    tables, lps = [], []
    for shard in tqdm(store.shards(WINDOWS), desc=f"scoring {split}", unit="shard", disable=not progress):
        import pyarrow.dataset as ds

        table = ds.dataset(shard, filesystem=store.fs, format="parquet").to_table(filter=pc.field("split") == split)
        if table.num_rows == 0:
            continue
        lp = ident.logprobs(logmel_matrix(table), batch_size)
        lps.append(lp if candidates is None else restrict(lp, candidates))
        tables.append(table.select(["path", "language", "speaker", "quality_flags"]))
    if not tables:
        raise StoreError(f"{store_uri}: no windows in split {split!r}")
    windows = pa.concat_tables(tables)
    silent = pc.match_substring(windows.column("quality_flags"), "silent").fill_null(False)
    files, file_lp = metrics.aggregate_windows(np.concatenate(lps), windows.column("path").to_pylist(),
                                               ~silent.to_numpy(zero_copy_only=False))
    languages, speakers = file_values(windows, files, ("language", "speaker"))
    return files, languages, speakers, file_lp


def file_values(windows: pa.Table, files: list, columns: Sequence[str]) -> list[list]:
    """Each column's value for each of `files` (in that order), from their windows' rows."""
    first = windows.group_by("path", use_threads=False).aggregate([(c, "first") for c in columns])
    # looked up by path: Arrow orders its groups its own way (not first-seen when a file's windows are apart)
    row = {p: i for i, p in enumerate(first.column("path").to_pylist())}
    return [[values[row[f]] for f in files] for values in (first.column(f"{c}_first").to_pylist() for c in columns)]


def evaluate(model_dir: str, store_uri: str, output: str, split: str = "test", batch_size: Optional[int] = None,
             progress: bool = True, window_seconds: Optional[float] = None,
             languages: Optional[list] = None, backend: str = "onnx") -> dict:
    """Write metrics.json, predictions.csv, confusion_matrix.csv/.png and report.md into `output`; `languages`
    restricts the answers to these candidates, as labeling does; `backend` runs a trained model (load_model's)."""
    from langid.plots import confusion_matrix_png
    from langid.whisper import parse_spec

    ident = load_model(model_dir, window_seconds=window_seconds, backend=backend)
    idx = ident.candidate_indices(languages)
    labels = [ident.labels[i] for i in idx]
    files, langs, speakers, file_lp = score_store(ident, store_uri, split, batch_size, progress, idx)
    known = np.array([lang in labels for lang in langs])
    skipped = sorted({lang for lang, k in zip(langs, known) if not k})
    scored = ~np.isnan(file_lp).any(axis=1)  # the others are labeling's 'unknown': left out, and listed
    no_speech = [f for f, k, s in zip(files, known, scored) if k and not s]
    keep = known & scored
    files = [f for f, k in zip(files, keep) if k]
    speakers = [s for s, k in zip(speakers, keep) if k]
    y_true = np.array([labels.index(lang) for lang, k in zip(langs, keep) if k])
    file_lp = file_lp[keep]
    y_pred = file_lp.argmax(axis=1)
    report = metrics.classification_report(y_true, y_pred, labels)
    correct = int((y_true == y_pred).sum())
    low, high = metrics.accuracy_ci(correct, len(y_true))
    result = {
        "model": model_dir, "store": store_uri, "split": split, "files": len(files),
        "languages_not_in_model": skipped, "files_without_speech": no_speech,
        "accuracy": report["accuracy"], "accuracy_ci95": [low, high], "macro_f1": report["macro_f1"],
        "cavg": metrics.cavg(file_lp, y_true), "eer": _safe(metrics.eer, file_lp, y_true),
        "per_language": report["per_language"], "confusion_matrix": report["confusion_matrix"],
        "labels": labels, "per_speaker": metrics.per_group_accuracy(y_true, y_pred, speakers),
    }
    with StagedFolder(output) as local:  # a URI output is written locally, then copied
        with open(os.path.join(local, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
        probs = np.exp(file_lp)
        with open(os.path.join(local, "predictions.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "speaker", "language", "predicted", "confidence", *[f"p_{x}" for x in labels]])
            for i, path in enumerate(files):
                w.writerow([path, speakers[i], labels[y_true[i]], labels[y_pred[i]], f"{probs[i].max():.6f}",
                            *[f"{p:.6f}" for p in probs[i]]])
        # the languages spoken or answered: an open-set model's matrix would otherwise be 99 x 99, nearly all zeros
        cm = np.array(report["confusion_matrix"])
        shown = [i for i in range(len(labels)) if cm[i].any() or cm[:, i].any()]
        cm, shown_labels = cm[np.ix_(shown, shown)], [labels[i] for i in shown]
        with open(os.path.join(local, "confusion_matrix.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true \\ predicted", *shown_labels])
            for lang, row in zip(shown_labels, cm.tolist()):
                w.writerow([lang, *row])
        confusion_matrix_png(cm, shown_labels,
                             os.path.join(local, "confusion_matrix.png"), title=f"Confusion matrix ({split}, {len(files)} files)")
        curves = "" if parse_spec(model_dir) else os.path.join(local_folder(model_dir), "training_curves.png")
        if curves and os.path.exists(curves):
            shutil.copy(curves, os.path.join(local, "training_curves.png"))
        write_report(result, local, has_curves=bool(curves) and os.path.exists(curves), meta=ident.meta)
    return result


def _safe(fn, *args) -> Optional[float]:
    try:
        return fn(*args)
    except ValueError:  # e.g. EER with only one language present
        return None


def write_report(r: dict, output: str, has_curves: bool, meta: dict) -> str:
    """A short Markdown report with the figures."""
    low, high = r["accuracy_ci95"]
    eer = "n/a" if r["eer"] is None else f"{r['eer']:.4f}"
    lines = [
        f"# langid evaluation: {os.path.basename(os.path.normpath(r['model']))} on {r['split']}",
        "",
        f"Model `{r['model']}` ({meta['architecture']}, languages {', '.join(r['labels'])}); "
        f"store `{r['store']}`, split `{r['split']}`, {r['files']} files (a file's score averages its speech windows).",
        "",
        "| metric | value |", "|---|---|",
        f"| accuracy | {r['accuracy']:.4f} (95% CI {low:.4f}–{high:.4f}, Wilson) |",
        f"| macro F1 | {r['macro_f1']:.4f} |",
        f"| Cavg (NIST LRE, P_target 0.5) | {r['cavg']:.4f} |",
        f"| EER (pooled) | {eer} |",
        "",
        "## Per language", "", "| language | precision | recall | F1 | files |", "|---|---|---|---|---|",
    ]
    for lang, m in r["per_language"].items():
        lines.append(f"| {lang} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |")
    lines += ["", "## Per speaker", "", "| speaker | files | accuracy |", "|---|---|---|"]
    for spk, m in r["per_speaker"].items():
        lines.append(f"| {spk} | {m['n']} | {m['accuracy']:.4f} |")
    if r["languages_not_in_model"]:
        lines += ["", f"Files in languages the model does not know were left out: {', '.join(r['languages_not_in_model'])}."]
    if r["files_without_speech"]:
        lines += ["", f"{len(r['files_without_speech'])} files without speech, which labeling answers 'unknown', were "
                  "left out (metrics.json: files_without_speech)."]
    lines += ["", "## Confusion matrix", "", "![confusion matrix](confusion_matrix.png)", "",
              "Counts in `confusion_matrix.csv` (rows: true language, columns: predicted)."]
    if has_curves:
        lines += ["", "## Training curves", "", "![training curves](training_curves.png)"]
    path = os.path.join(output, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def true_language(key: str, labels: Sequence[str]) -> Optional[str]:
    """The language a file's name or folder tells (Kaggle name, or a parent folder named after a language)."""
    from langid.sources import BadName, parse_kaggle_name

    name = key.split(MEMBER_SEP)[-1]
    try:
        return parse_kaggle_name(os.path.basename(name))["language"]
    except BadName:
        parts = name.replace("\\", "/").split("/")[:-1]
        return next((p for p in reversed(parts) if p in labels), None)


def accuracy_from_names(answers: Iterable[tuple[str, str]], labels: Sequence[str]) -> tuple[int, int]:
    """(files whose name tells their language, of them answered with it) among (path, answer) pairs."""
    known = correct = 0
    for path, answer in answers:
        truth = true_language(path, labels)
        if truth is not None:
            known += 1
            correct += truth == answer
    return known, correct
