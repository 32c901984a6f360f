"""A `langid label` CSV read as a preprocessing manifest: confident answers only, grouped splits, end to end."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from conftest import tone, write_wav
from langid.cli import build_parser
from langid.config import FeatureConfig
from langid.labeling import BASE_COLUMNS
from langid.preprocess import PreprocessResult, run_preprocess
from langid.sources import (
    ANSWERED_UNKNOWN,
    LABEL_FAILED,
    LOW_CONFIDENCE,
    UNKNOWN,
    ManifestOptions,
    SourceFile,
    assign_splits,
    find_sources,
    load_manifest,
)
from langid.store import ERRORS, WINDOWS, Store

CFG = FeatureConfig(window_seconds=2.0, n_mels=32)
ARCHIVE_ERROR = "archive members cannot be preprocessed from a manifest; extract the archive first"


def label_row(path: str, language: str = "", confidence="", status: str = "ok", error: str = "") -> dict:
    """A row as `langid label` writes it (the columns that matter here filled, the others plausible)."""
    answered = status == "ok"
    return {"path": path, "language": language, "confidence": confidence,
            "top_languages": f"{language} {confidence}" if answered else "", "duration": 3.0 if answered else "",
            "windows": 2 if answered else 0, "windows_used": 2 if answered else 0, "status": status, "error": error}


def write_labels(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=BASE_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def by_name(records: list, root: Path) -> dict:
    return {os.path.relpath(r.path, root): r for r in records}


@pytest.fixture
def labels(tmp_path):
    """A label CSV with every kind of row: confident, unsure, failed, unknown, a note, an unreadable confidence."""
    return write_labels(tmp_path / "labels.csv", [
        label_row("a.wav", "en", 0.95),
        label_row("b.wav", "de", 0.55),
        label_row("c.wav", status="error", error="not a readable audio file"),
        label_row("d.wav", UNKNOWN, 0.3),
        label_row("e.wav", "en", 0.8, error="no speech detected; all windows used"),  # a note, still an answer
        label_row("f.wav", "", "", status="ok"),  # answered nothing
    ])


# --- reading a label CSV -------------------------------------------------------------------------

def test_label_csv_keeps_answered_rows_and_counts_the_rest(labels, tmp_path):
    found = load_manifest(str(labels))
    recs = by_name(found.records, tmp_path)
    assert set(recs) == {"a.wav", "b.wav", "e.wav"}
    assert found.left_out == {LABEL_FAILED: 1, ANSWERED_UNKNOWN: 2}
    a = recs["a.wav"]
    assert a.path == str(tmp_path / "a.wav")  # relative to the CSV's folder
    assert (a.language, a.split, a.error) == ("en", None, None)
    assert a.recording_id == a.speaker == a.path  # no speaker column: each file alone
    assert recs["e.wav"].error is None  # the labeler's note is not an input error


def test_min_confidence_filters_answers(labels, tmp_path):
    found = load_manifest(str(labels), ManifestOptions(min_confidence=0.8))
    assert set(by_name(found.records, tmp_path)) == {"a.wav", "e.wav"}  # 0.8 itself is kept
    assert found.left_out == {LABEL_FAILED: 1, ANSWERED_UNKNOWN: 2, LOW_CONFIDENCE: 1}
    assert list(found.left_out) == [LABEL_FAILED, ANSWERED_UNKNOWN, LOW_CONFIDENCE]  # the summary's order
    assert load_manifest(str(labels), ManifestOptions(min_confidence=0.96)).records == []


def test_unreadable_confidence_is_a_row_error(tmp_path):
    labels = write_labels(tmp_path / "labels.csv", [label_row("a.wav", "en", "high"), label_row("b.wav", "en", 0.9)])
    bad, good = load_manifest(str(labels), ManifestOptions(min_confidence=0.5)).records
    assert "line 2" in bad.error and "'high'" in bad.error and "confidence" in bad.error
    assert good.error is None
    assert [r.error for r in load_manifest(str(labels)).records] == [None, None]  # no filter: never parsed


def test_unknown_is_the_labelers_word():
    from langid.inference import UNKNOWN as LABELERS

    assert UNKNOWN == LABELERS


# --- grouping for the split ----------------------------------------------------------------------

def test_group_by_folder_keeps_a_folder_on_one_side(tmp_path):
    rows = [label_row(f"{lang}{s}/clip{i}.wav", lang, 0.9) for lang in ("en", "de") for s in range(4) for i in range(3)]
    labels = write_labels(tmp_path / "labels.csv", rows)
    recs = load_manifest(str(labels), ManifestOptions(group_by="folder")).records
    for r in recs:
        assert r.recording_id == r.speaker == os.path.dirname(r.path)
    assert len({r.recording_id for r in recs}) == 8
    for seed in range(5):
        split = assign_splits(recs, valid_fraction=0.25, seed=seed)
        sides: dict = {}
        for r in split:
            sides.setdefault(r.recording_id, set()).add(r.split)
        assert all(len(s) == 1 for s in sides.values())
        for lang in ("en", "de"):  # one of each language's four folders is validated
            assert sum(r.split == "valid" for r in split if r.language == lang) == 3


def test_group_by_speaker_and_file(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,language,speaker\ns1/a.wav,en,alice\ns1/b.wav,en,\ns2/c.wav,de,bob\n", encoding="utf-8")
    a, b, c = load_manifest(str(manifest)).records  # speaker: the column, else the file
    assert (a.recording_id, b.recording_id, c.recording_id) == ("alice", b.path, "bob")
    assert [r.recording_id for r in load_manifest(str(manifest), ManifestOptions(group_by="file")).records] == [a.path, b.path, c.path]
    folders = load_manifest(str(manifest), ManifestOptions(group_by="folder")).records  # the folder wins over the speaker column
    assert [r.speaker for r in folders] == [str(tmp_path / "s1")] * 2 + [str(tmp_path / "s2")]


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="--group-by must be one of speaker, folder, file"):
        ManifestOptions(group_by="recording")
    with pytest.raises(ValueError, match=r"--min-confidence must be in \[0, 1\]"):
        ManifestOptions(min_confidence=1.5)


# --- rows that cannot be used, options that do not apply -----------------------------------------

def test_archive_members_get_a_row_error(tmp_path):
    labels = write_labels(tmp_path / "labels.csv", [
        label_row("batch.tar::speaker1/a.flac", "en", 0.99),
        label_row("broken.zip::", status="error", error="unreadable archive"),  # as label writes a bad archive
        label_row("loose.wav", "en", 0.99),
    ])
    found = load_manifest(str(labels))
    member, loose = found.records
    assert member.error == f"manifest line 2: {ARCHIVE_ERROR}"
    assert member.language == "en"
    assert loose.error is None
    assert found.left_out == {LABEL_FAILED: 1}


def test_min_confidence_needs_a_confidence_column(tmp_path):
    manifest = tmp_path / "plain.csv"
    manifest.write_text("path,language\na.wav,en\n", encoding="utf-8")
    with pytest.raises(ValueError) as ei:
        load_manifest(str(manifest), ManifestOptions(min_confidence=0.5))
    assert str(manifest) in str(ei.value) and "'confidence' column" in str(ei.value)
    assert len(load_manifest(str(manifest), ManifestOptions(min_confidence=0.0)).records) == 1


def test_manifest_options_on_a_tree_are_refused(tmp_path):
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "a.wav").write_bytes(b"x")
    with pytest.raises(ValueError, match="apply to a CSV/TSV manifest, not a folders tree"):
        find_sources(str(tmp_path), manifest=ManifestOptions(min_confidence=0.5))


def test_plain_manifest_unchanged(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,language,speaker,confidence\naudio/a.wav,en,s1,0.1\naudio/b.wav,unknown,,\n"
                        "audio/c.wav,,,\n", encoding="utf-8")
    found = load_manifest(str(manifest))
    a, b, c = found.records
    assert found.left_out == {}
    assert a == SourceFile(path=str(tmp_path / "audio" / "a.wav"), language="en", split=None, recording_id="s1",
                           speaker="s1", gender=None, fragment=None, augmentation=None, augmentation_index=None,
                           error=None)
    assert b.language == "unknown" and b.error is None  # without a status column it is just a language name
    assert c.error == "manifest line 4: empty language"  # an input error, as before, not left out


# --- the command -----------------------------------------------------------------------------

def test_summary_names_what_was_left_out():
    res = PreprocessResult(store="/s", files_seen=2, skipped_done=0, ok=2, windows=4)
    assert "left out" not in res.summary()
    res.left_out = {LABEL_FAILED: 1, LOW_CONFIDENCE: 2}
    assert res.summary().splitlines()[-1] == "3 label rows left out: 1 labeling failed, 2 below the minimum confidence"


def test_cli_flags():
    base = ["preprocess", "--input", "labels.csv", "--output", "store"]
    a = build_parser().parse_args(base)
    assert (a.min_confidence, a.group_by) == (0.0, "speaker")
    a = build_parser().parse_args(base + ["--min-confidence", "0.8", "--group-by", "folder"])
    assert (a.min_confidence, a.group_by) == (0.8, "folder")
    for bad in (["--min-confidence", "1.5"], ["--group-by", "recording"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(base + bad)


# --- end to end: label CSV -> store --------------------------------------------------------------

@pytest.mark.slow
def test_label_csv_to_store(ray_local, tmp_path):
    archive = tmp_path / "archive"
    freq = {"en": 300.0, "de": 900.0}
    kept = {"en1/a.wav": "en", "en1/b.wav": "en", "en2/c.wav": "en", "de1/d.wav": "de", "de2/e.wav": "de",
            "de2/f.wav": "de"}
    for i, (rel, lang) in enumerate(kept.items()):
        write_wav(archive / rel, tone(freq[lang], 3.0, 16000, seed=i), 16000)
    for rel in ("odd/unknown.wav", "odd/unsure.wav"):  # decodable: only the labels keep them out
        write_wav(archive / rel, tone(600.0, 3.0, 16000), 16000)
    rows = [label_row(rel, lang, 0.9 + 0.01 * i) for i, (rel, lang) in enumerate(kept.items())]
    rows += [label_row("odd/broken.wav", status="error", error="not a readable audio file"),
             label_row("odd/unknown.wav", UNKNOWN, 0.4),
             label_row("odd/unsure.wav", "en", 0.6),
             label_row("more.tar::x/g.wav", "de", 0.99)]
    labels = write_labels(archive / "labels.csv", rows)  # where `label` ran, as usual

    res = run_preprocess(str(labels), str(tmp_path / "store"), CFG, valid_fraction=0.5, batch_size=4, progress=False,
                         manifest=ManifestOptions(min_confidence=0.8, group_by="folder"))
    assert (res.files_seen, res.ok, res.failed) == (7, 6, 1), res.summary()
    assert res.left_out == {LABEL_FAILED: 1, ANSWERED_UNKNOWN: 1, LOW_CONFIDENCE: 1}
    assert "3 label rows left out" in res.summary()

    st = Store(str(tmp_path / "store"))
    win = st.read(WINDOWS, columns=["path", "language", "split", "recording_id"]).to_pandas()
    files = win.drop_duplicates("path").set_index("path")
    assert set(files.index) == {str(archive / rel) for rel in kept}
    assert {os.path.relpath(p, archive): lang for p, lang in files.language.items()} == kept
    assert (files.recording_id == files.index.map(os.path.dirname)).all()
    assert (win.groupby("recording_id").split.nunique() == 1).all()  # a folder is on one side
    for lang in freq:  # two folders per language, half validated: one each side
        assert set(files[files.language == lang].split) == {"train", "valid"}
    err = st.read(ERRORS).to_pylist()
    assert [(e["path"], e["error"]) for e in err] == [(str(archive / "more.tar::x/g.wav"),
                                                       f"manifest line 11: {ARCHIVE_ERROR}")]
