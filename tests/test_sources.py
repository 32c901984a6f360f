"""Finding labelled audio: the Kaggle name parser, the three source layouts and the grouped split."""
from __future__ import annotations

import os
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from langid.sources import (
    KAGGLE_PATTERN,
    SPLITS,
    BadName,
    SourceFile,
    assign_splits,
    detect_format,
    find_sources,
    load_manifest,
    parse_kaggle_name,
    scan_folders,
    scan_kaggle,
)

RID = "0123456789abcdef0123456789abcdef"  # 32 lowercase hex digits


# --- parse_kaggle_name ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, expected",
    [
        (f"en_m_{RID}.fragment3.flac",
         dict(language="en", gender="m", recording_id=RID, fragment=3, augmentation="original", augmentation_index=None)),
        (f"de_f_{RID}.fragment0.speed2.flac",
         dict(language="de", gender="f", recording_id=RID, fragment=0, augmentation="speed", augmentation_index=2)),
        (f"es_m_{RID}.fragment1.pitch7.flac",
         dict(language="es", gender="m", recording_id=RID, fragment=1, augmentation="pitch", augmentation_index=7)),
        (f"en_f_{RID}.fragment5.noise1.flac",
         dict(language="en", gender="f", recording_id=RID, fragment=5, augmentation="noise", augmentation_index=1)),
        # multi-digit fragment and augmentation index are whole numbers, not their first digit
        (f"en_m_{RID}.fragment128.speed12.flac",
         dict(language="en", gender="m", recording_id=RID, fragment=128, augmentation="speed", augmentation_index=12)),
        # three-letter language code
        (f"yue_f_{RID}.fragment2.flac",
         dict(language="yue", gender="f", recording_id=RID, fragment=2, augmentation="original", augmentation_index=None)),
        # the Kaggle test set keeps its files in test/<lang>/ (and test/test/): only the base name counts
        (f"test/de/de_f_{RID}.fragment9.flac",
         dict(language="de", gender="f", recording_id=RID, fragment=9, augmentation="original", augmentation_index=None)),
        (f"/data/kaggle/train/train/en_m_{RID}.fragment0.noise3.flac",
         dict(language="en", gender="m", recording_id=RID, fragment=0, augmentation="noise", augmentation_index=3)),
    ],
)
def test_parse_kaggle_name_fields(name, expected):
    assert parse_kaggle_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        f"en_x_{RID}.fragment0.flac",            # gender must be m or f
        f"en_m_{RID[:31]}.fragment0.flac",       # 31 hex digits
        f"en_m_{RID}0.fragment0.flac",           # 33 hex digits
        f"en_m_{RID[:-1]}g.fragment0.flac",      # not hex
        f"EN_m_{RID}.fragment0.flac",            # uppercase language
        f"en_M_{RID}.fragment0.flac",            # uppercase gender
        f"en_m_{RID.upper()}.fragment0.flac",    # uppercase id
        f"en_m_{RID}.fragment0.FLAC",            # uppercase extension
        f"en_m_{RID}.fragment0.wav",             # wrong extension
        f"en_m_{RID}.flac",                      # missing fragment
        f"en_m_{RID}.fragment.flac",             # fragment without a number
        f"en_m_{RID}.fragment0.speed1.pitch2.flac",  # double suffix
        f"en_m_{RID}.fragment0.speed.flac",      # suffix without an index
        f"en_m_{RID}.fragment0.echo1.flac",      # unknown augmentation
        f"english_m_{RID}.fragment0.flac",       # language code too long
        "badname.flac",
    ],
)
def test_parse_kaggle_name_rejects(name):
    with pytest.raises(BadName) as ei:
        parse_kaggle_name(name)
    msg = str(ei.value)
    assert name in msg
    assert KAGGLE_PATTERN in msg
    assert isinstance(ei.value, ValueError)  # callers catching ValueError see it too


# --- scan_kaggle ---------------------------------------------------------------------------------

def test_scan_kaggle_tree(kaggle_tree):
    records = scan_kaggle(str(kaggle_tree))
    paths = [r.path for r in records]
    on_disk = sorted(str(p) for p in kaggle_tree.rglob("*.flac"))
    assert sorted(paths) == on_disk  # every audio file, once, bad ones included
    assert len(paths) == len(set(paths)) == 24
    assert all(os.path.isabs(p) for p in paths)

    by_name = {os.path.basename(r.path): r for r in records}
    bad = by_name["badname.flac"]
    assert bad.error is not None and KAGGLE_PATTERN in bad.error
    assert bad.language is None and bad.recording_id is None

    tests = [r for r in records if os.sep + "test" + os.sep in r.path]
    assert len(tests) == 2
    assert all(r.split == "test" for r in tests)
    train = [r for r in records if r not in tests]
    assert all(r.split is None for r in train)  # train/valid is decided later by assign_splits

    good = [r for r in records if r.error is None]
    assert len(good) == 23
    for r in good:
        f = parse_kaggle_name(r.path)
        assert {k: getattr(r, k) for k in f} == f
        assert r.speaker == r.recording_id
    speed = [r for r in good if r.augmentation == "speed"]
    assert len(speed) == 6 and all(r.augmentation_index == 1 and r.fragment == 0 for r in speed)


def test_scan_kaggle_test_lang_subfolder_and_non_audio(tmp_path):
    root = tmp_path / "kaggle"
    for rel in [f"train/train/en_m_{RID}.fragment0.flac", f"test/de/de_f_{RID}.fragment1.flac",
                f"test/test/es_m_{RID}.fragment2.pitch3.flac", "train/train/readme.txt", "test/de/notes.csv"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    records = {os.path.relpath(r.path, root): r for r in scan_kaggle(str(root))}
    assert set(records) == {f"train/train/en_m_{RID}.fragment0.flac", f"test/de/de_f_{RID}.fragment1.flac",
                            f"test/test/es_m_{RID}.fragment2.pitch3.flac"}
    assert records[f"test/de/de_f_{RID}.fragment1.flac"].split == "test"
    assert records[f"test/de/de_f_{RID}.fragment1.flac"].language == "de"
    assert records[f"test/test/es_m_{RID}.fragment2.pitch3.flac"].split == "test"
    assert records[f"train/train/en_m_{RID}.fragment0.flac"].split is None
    assert detect_format(str(root)) == "kaggle"


# --- scan_folders and manifests ------------------------------------------------------------------

def test_scan_folders(tmp_path):
    root = tmp_path / "corpus"
    for rel in ["en/alice/a1.wav", "en/alice/a2.flac", "en/bob.wav", "fr/claire/sub/c1.ogg",
                "loose.wav", "en/alice/notes.txt"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    assert detect_format(str(root)) == "folders"
    recs = {os.path.relpath(r.path, root): r for r in find_sources(str(root)).records}
    assert set(recs) == {"en/alice/a1.wav", "en/alice/a2.flac", "en/bob.wav", "fr/claire/sub/c1.ogg", "loose.wav"}
    assert recs["en/alice/a1.wav"].language == "en"
    assert recs["en/alice/a1.wav"].speaker == recs["en/alice/a2.flac"].speaker == "en/alice"
    assert recs["en/alice/a1.wav"].recording_id == "en/alice"
    assert recs["en/bob.wav"].speaker == "en/bob"  # file directly in the language folder: its stem
    assert recs["fr/claire/sub/c1.ogg"].speaker == "fr/claire"
    assert all(r.split is None and r.error is None for k, r in recs.items() if k != "loose.wav")
    assert recs["loose.wav"].error and "language folder" in recs["loose.wav"].error
    assert recs["loose.wav"].language is None


def test_scan_folders_test_subtree(tmp_path):
    root = tmp_path / "corpus"
    for rel in ["train/en/a.wav", "test/en/b.wav"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    train = scan_folders(str(root / "train"))
    test = scan_folders(str(root / "test"))
    assert [r.split for r in train] == [None]
    assert [(r.language, r.split) for r in test] == [("en", "test")]


@pytest.mark.parametrize("sep, suffix", [(",", ".csv"), ("\t", ".tsv")])
def test_load_manifest(tmp_path, sep, suffix):
    (tmp_path / "audio").mkdir()
    abs_path = str(tmp_path / "elsewhere" / "z.wav")
    rows = [
        ["path", "language", "split", "speaker"],
        ["audio/a.wav", "en", "train", "s1"],
        ["audio/b.wav", "de", "", ""],
        [abs_path, "fr", "test", "s2"],
        ["audio/c.wav", "en", "validation", "s3"],  # bad split value
        ["", "en", "", ""],                          # empty path
        ["audio/d.wav", "", "", ""],                 # empty language
        ["s3://bucket/e.wav", "es", "valid", ""],    # URIs are kept as they are
    ]
    manifest = tmp_path / f"m{suffix}"
    manifest.write_text("\n".join(sep.join(r) for r in rows) + "\n", encoding="utf-8")
    assert detect_format(str(manifest)) == "manifest"
    recs = find_sources(str(manifest)).records
    assert len(recs) == 7  # a bad row is an error record, never silently dropped
    a, b, z, c, empty, nolang, uri = recs
    assert a.path == str(tmp_path / "audio" / "a.wav")  # relative to the manifest, not the cwd
    assert (a.language, a.split, a.speaker, a.recording_id, a.error) == ("en", "train", "s1", "s1", None)
    assert b.split is None and b.error is None
    assert b.speaker == b.recording_id == b.path  # no speaker: each file is its own group
    assert z.path == abs_path and z.split == "test"
    assert c.error and "line 5" in c.error and "'validation'" in c.error
    assert all(s in c.error for s in SPLITS)
    assert empty.error and "line 6" in empty.error and "empty path" in empty.error
    assert nolang.error and "line 7" in nolang.error and "empty language" in nolang.error
    assert uri.path == "s3://bucket/e.wav" and uri.error is None


@pytest.mark.parametrize("header", ["name,language", "path,lang", "path", ""])
def test_load_manifest_missing_columns(tmp_path, header):
    manifest = tmp_path / "m.csv"
    manifest.write_text(header + "\n" + ("x.wav,en\n" if header else ""), encoding="utf-8")
    with pytest.raises(ValueError) as ei:
        load_manifest(str(manifest))
    assert "path" in str(ei.value) and "language" in str(ei.value) and str(manifest) in str(ei.value)


def test_load_manifest_accepts_file_column(tmp_path):
    """The shared realspeech manifest names its path column `file`."""
    manifest = tmp_path / "m.tsv"
    manifest.write_text("file\tlanguage\nde/a.wav\tde\n", encoding="utf-8")
    (rec,) = load_manifest(str(manifest)).records
    assert rec.path == str(tmp_path / "de" / "a.wav") and rec.language == "de" and rec.error is None


def test_find_sources_missing_input_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError):
        find_sources(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown source format"):
        find_sources(str(tmp_path), "zip")


# --- assign_splits -------------------------------------------------------------------------------

def _rec(path, language, recording_id, split=None, error=None, **kw):
    return SourceFile(path=path, language=language, recording_id=recording_id, split=split, error=error, **kw)


def _splits_by_recording(records):
    out = defaultdict(set)
    for r in records:
        if r.error is None:
            out[r.recording_id].add(r.split)
    return out


def test_assign_splits_on_kaggle_tree(kaggle_tree):
    records = scan_kaggle(str(kaggle_tree))
    out = assign_splits(records, valid_fraction=0.2, seed=0)
    assert [r.path for r in out] == [r.path for r in records]  # same records, same order
    assert records[0] is not out[0] and all(r.split in (None, "test") for r in records)  # input untouched
    for rid, splits in _splits_by_recording(out).items():
        assert len(splits) == 1, (rid, splits)  # fragments and speed/pitch/noise twins travel together
    by_lang = defaultdict(lambda: defaultdict(set))
    for r in out:
        if r.error is None:
            by_lang[r.language][r.split].add(r.recording_id)
    for lang in ("en", "de"):  # four recordings each (three tones and one broken file)
        assert by_lang[lang]["valid"], lang
        assert by_lang[lang]["train"], lang
        assert by_lang[lang]["test"] == {f"{lang}test".encode().hex().ljust(32, "0")}
    assert set(by_lang["es"]) == {"train"}  # a single recording cannot be validated
    bad = [r for r in out if r.error is not None]
    assert len(bad) == 1 and bad[0].split is None


def test_assign_splits_twins_follow_their_recording():
    records = []
    for i in range(20):
        rid = f"{i:032x}"
        records.append(_rec(f"en_m_{rid}.fragment0.flac", "en", rid, augmentation="original"))
        for aug in ("speed", "pitch", "noise"):
            for k in range(1, 4):
                records.append(_rec(f"en_m_{rid}.fragment0.{aug}{k}.flac", "en", rid, augmentation=aug))
    out = assign_splits(records, 0.25, seed=3)
    by_rid = _splits_by_recording(out)
    assert all(len(s) == 1 for s in by_rid.values())
    n_valid = sum(s == {"valid"} for s in by_rid.values())
    assert n_valid == 5  # round(0.25 * 20) recordings, counted by recording and not by file


def test_assign_splits_every_language_validated():
    records = [_rec("a", "en", "r1"), _rec("b", "en", "r2"),  # 0.2 * 2 rounds to 0, but still one valid
               _rec("c", "fr", "r3"),                           # one recording: train only
               _rec("d", "de", "r4"), _rec("e", "de", "r5"), _rec("f", "de", "r6")]
    for seed in range(10):
        out = {r.path: r.split for r in assign_splits(records, 0.2, seed)}
        assert sorted([out["a"], out["b"]]) == ["train", "valid"]
        assert out["c"] == "train"
        assert sorted([out["d"], out["e"], out["f"]]) == ["train", "train", "valid"]
    # a large fraction still leaves every language something to train on
    out = {r.path: r.split for r in assign_splits(records, 0.95, 0)}
    assert "train" in {out["a"], out["b"]} and "train" in {out["d"], out["e"], out["f"]}
    # fraction 0: nothing is validated
    assert {r.split for r in assign_splits(records, 0.0, 0)} == {"train"}


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_assign_splits_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError):
        assign_splits([_rec("a", "en", "r1")], fraction)


def _synthetic(n_langs=4, n_recordings=50, per_recording=3):
    return [_rec(f"{lang}/{r}/{k}.wav", lang, f"{lang}-{r}")
            for lang in [f"l{i}" for i in range(n_langs)] for r in range(n_recordings) for k in range(per_recording)]


def test_assign_splits_deterministic_per_seed():
    records = _synthetic()
    a = [r.split for r in assign_splits(records, 0.2, seed=7)]
    b = [r.split for r in assign_splits(list(reversed(records)), 0.2, seed=7)][::-1]
    assert a == [r.split for r in assign_splits(records, 0.2, seed=7)]
    assert a == b  # independent of the order the files were found in
    c = [r.split for r in assign_splits(records, 0.2, seed=8)]
    assert a != c
    # and each seed gives the requested share per language: round(0.2 * 50) = 10 of 50 recordings
    for splits in (a, c):
        valid_recs = {r.recording_id for r, s in zip(records, splits) if s == "valid"}
        per_lang = defaultdict(int)
        for rid in valid_recs:
            per_lang[rid.split("-")[0]] += 1
        assert dict(per_lang) == {f"l{i}": 10 for i in range(4)}


def test_assign_splits_keeps_given_splits_and_errors():
    records = [_rec("t1", "en", "t", split="test"), _rec("t2", "en", "u", split="train"),
               _rec("v1", "en", "v", split="valid"), _rec("x", None, None, error="bad name"),
               _rec("a", "en", "r1"), _rec("b", "en", "r2")]
    out = {r.path: r for r in assign_splits(records, 0.5, 0)}
    assert out["t1"].split == "test" and out["t2"].split == "train" and out["v1"].split == "valid"
    assert out["x"].split is None and out["x"].error == "bad name"
    assert sorted([out["a"].split, out["b"].split]) == ["train", "valid"]


# A recording belongs to one language, and a recording's files either all come with a fixed split
# (Kaggle's test folder, a manifest's split column) or all without one, as the sources produce them.
_recording = st.tuples(
    st.sampled_from(["en", "de", "fr", "es", "ru"]),
    st.sampled_from([None, None, None, "test", "train", "valid"]),
    st.integers(min_value=1, max_value=4),  # files of the recording (fragments / augmented twins)
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recordings=st.lists(_recording, max_size=40), fraction=st.floats(0, 0.99), seed=st.integers(0, 2**31),
       n_errors=st.integers(0, 3), shuffle=st.randoms(use_true_random=False))
def test_assign_splits_property_no_recording_in_two_splits(recordings, fraction, seed, n_errors, shuffle):
    records = [_rec(f"{i}/{k}", lang, f"rec{i}", split=split)
               for i, (lang, split, n) in enumerate(recordings) for k in range(n)]
    records += [_rec(f"err{j}", None, None, error="bad") for j in range(n_errors)]
    shuffle.shuffle(records)
    out = assign_splits(records, fraction, seed)
    assert len(out) == len(records)
    assert all(r.split in SPLITS for r in out if r.error is None)
    seen: dict = {}
    for r in out:
        if r.error is None:
            assert seen.setdefault(r.recording_id, r.split) == r.split, r.recording_id
    # every language with two or more unsplit recordings is validated (when a fraction is asked for)
    free = defaultdict(set)
    for i, (lang, split, _) in enumerate(recordings):
        if split is None:
            free[lang].add(f"rec{i}")
    for lang, rids in free.items():
        got = {seen[rid] for rid in rids}
        if len(rids) >= 2 and fraction > 0:
            assert got == {"train", "valid"}, (lang, got)
        elif fraction == 0:
            assert got == {"train"}
