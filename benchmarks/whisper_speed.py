#!/usr/bin/env python
"""langid's Whisper backend against faster-whisper's own `detect_language`, per clip, on real speech.

    python benchmarks/whisper_speed.py [--model base] [--windows 5,10,30] [--threads 2]

Clips: the `sentence` clips of ../shared/data/realspeech plus the first 4 Common Voice clips of each of its 7
languages (../shared/data/commonvoice), decoded once to 16 kHz mono before any timing. The baseline is
`WhisperModel.detect_language(audio)` (faster-whisper 1.2: the first 30 s, padded to 30 s); langid's backend is
`load_model("whisper:base", window_seconds=W).predict(audio)`: every W-second window of the clip (a clip shorter
than W is one window of W seconds), features, encoder and language posteriors included. Both run int8 on the
same threads, in this process. Accuracy is open-set: the top language among Whisper's 99 against the manifest.
The cost of a clip grows with its windows: linear in its duration beyond one window.

    python benchmarks/whisper_speed.py --student [--whisper-clips 70]

--student instead compares what a user would run on the 700 Common Voice clips of ../shared/data/commonvoice: the
label job with a trained student (resnet18 LangIdNet on log-mel, as the bootstrap recipe trains; random weights,
which do not change its speed; model.onnx beside it as training leaves it) run as `python jobs/label.py --model M
--input @list --output out.csv --quiet` in a fresh process with its own embedded Ray, timed end to end (Python's
start, Ray's start, decoding the MP3s, the model, the CSV), against faster-whisper's `detect_language` with
Whisper-base int8 (model loaded once; its load reported apart) on a random sample of the same clips, decoded to
16 kHz beforehand. Per clip: the job's wall / 700 against detect_language's mean. Results:
benchmarks/results/whisper_student.{md,json}. Without ../shared both modes print why and exit 0.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (CpuByRole, RowClock, facts_line, load_averages, machine_facts, markdown_table,  # noqa: E402
                    wait_for_quiet, write_results)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOAL_STUDENT_SPEEDUP = 20.0

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")
COMMONVOICE_PER_LANGUAGE = 4


def real_clips(shared: str) -> list[tuple[str, str]]:
    """(path, language) of the clips described above."""
    out = []
    with open(os.path.join(shared, "realspeech", "manifest.tsv"), newline="") as f:
        out += [(os.path.join(shared, "realspeech", r["file"]), r["language"])
                for r in csv.DictReader(f, delimiter="\t") if r["kind"] == "sentence"]
    seen: dict = {}
    with open(os.path.join(shared, "commonvoice", "manifest.tsv"), newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            if seen.get(r["language"], 0) < COMMONVOICE_PER_LANGUAGE:
                seen[r["language"]] = seen.get(r["language"], 0) + 1
                out.append((os.path.join(shared, "commonvoice", r["file"]), r["language"]))
    return out


def timed(fn, audios: list) -> tuple[list[str], float]:
    """(answers, seconds per clip) of fn over the clips, after one warm-up call."""
    fn(audios[0])
    t0 = time.perf_counter()
    answers = [fn(a) for a in audios]
    return answers, (time.perf_counter() - t0) / len(audios)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="base", help="Whisper size or folder (default %(default)s)")
    ap.add_argument("--windows", default="5,10,30", help="langid window lengths to measure (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both (default %(default)s)")
    ap.add_argument("--shared", default=SHARED)
    ap.add_argument("--student", action="store_true",
                    help="the label job with a trained student against detect_language, per clip (see above)")
    ap.add_argument("--whisper-clips", type=int, default=70,
                    help="--student: clips timed with detect_language, a random sample (default %(default)s)")
    ap.add_argument("--max-load", type=float, default=2.5,
                    help="--student: wait until the 1-minute load is at most this (default %(default)s)")
    ap.add_argument("--max-wait", type=float, default=600.0, help="--student: but at most this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--render", metavar="JSON", help="--student: only write the report again from its results JSON")
    a = ap.parse_args()
    if a.student and a.render:
        import json

        with open(a.render) as f:
            data = json.load(f)
        md = render_student(data)
        print(md)
        print(f"written: {', '.join(map(str, write_results('whisper_student', md, data)))}")
        return 0
    missing = [d for d in (("commonvoice",) if a.student else ("realspeech", "commonvoice"))
               if not os.path.isfile(os.path.join(a.shared, d, "manifest.tsv"))]
    if missing:
        print(f"skipped: no {', '.join(missing)} under {a.shared} (the shared real clips; see ../shared/data/README.md)")
        return 0
    if a.student:
        return student(a)

    from faster_whisper import WhisperModel

    from langid.audio import load_audio
    from langid.inference import load_model
    from langid.whisper import model_folder

    clips = real_clips(a.shared)
    audios = [load_audio(p, 16000).samples for p, _ in clips]
    truth = [lang for _, lang in clips]
    seconds = sum(len(x) for x in audios) / 16000
    print(f"{len(clips)} clips in {len(set(truth))} languages, {seconds / len(clips):.1f} s on average", flush=True)

    baseline = WhisperModel(model_folder(a.model), device="cpu", compute_type="int8", cpu_threads=a.threads)
    base_answers, base_s = timed(lambda x: baseline.detect_language(x)[0], audios)
    base_acc = sum(p == t for p, t in zip(base_answers, truth)) / len(truth)
    rows = [{"method": "faster-whisper detect_language (first 30 s, padded)", "accuracy": round(base_acc, 4),
             "s_per_clip": round(base_s, 4), "speedup": 1.0, "accuracy_change": 0.0}]
    for w in [float(x) for x in a.windows.split(",")]:
        ident = load_model(f"whisper:{a.model}", device="cpu", window_seconds=w, threads=a.threads)
        answers, s = timed(lambda x: ident.predict(x, sample_rate=16000).language, audios)
        acc = sum(p == t for p, t in zip(answers, truth)) / len(truth)
        rows.append({"method": f"langid whisper:{a.model}, {w:g}-s windows", "accuracy": round(acc, 4),
                     "s_per_clip": round(s, 4), "speedup": round(base_s / s, 2),
                     "accuracy_change": round(acc - base_acc, 4)})
        print(rows[-1], flush=True)
    facts = machine_facts(model=a.model, threads=a.threads, clips=len(clips), languages=len(set(truth)),
                          mean_clip_seconds=round(seconds / len(clips), 2))
    table = markdown_table(rows, [("method", "method"), ("accuracy", "accuracy (open set)"),
                                  ("accuracy_change", "vs baseline"), ("s_per_clip", "s per clip"),
                                  ("speedup", "speed-up")])
    md, js = write_results("whisper_speed", f"{table}\n\n{facts_line(facts)}", {"facts": facts, "results": rows})
    print(table)
    print(f"written: {md}, {js}")
    return 0


def commonvoice_clips(shared: str) -> list[tuple[str, str, float]]:
    """(path, language, duration s) of every Common Voice clip in the manifest, in its order."""
    with open(os.path.join(shared, "commonvoice", "manifest.tsv"), newline="") as f:
        return [(os.path.join(shared, "commonvoice", r["file"]), r["language"], float(r["duration_s"]))
                for r in csv.DictReader(f, delimiter="\t")]


def run_cli_label(model: str, listing: str, output: str) -> dict:
    """`python jobs/label.py ...` in a fresh process (its own embedded Ray), timed from the outside: wall, the first
    rows' arrival in the partial CSV, the steady rate, CPU of the whole process tree per role."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, os.path.join(REPO, "jobs", "label.py"), "--model", model, "--input", "@" + listing,
           "--output", output, "--quiet"]
    with CpuByRole() as cpu, RowClock(output + ".partial") as clock:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        end = time.perf_counter()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    with open(output, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {"command": " ".join(cmd), "wall": end - t0, "files": len(rows),
            "errors": sum(r["status"] != "ok" for r in rows), "windows": sum(int(r["windows"] or 0) for r in rows),
            **clock.phases(t0, end, len(rows)), "cpu_by_role": cpu.table(), "stderr": proc.stderr[-2000:],
            "stdout": proc.stdout[-2000:]}


def student(a: argparse.Namespace) -> int:
    """The label job with a student model against faster-whisper's detect_language, per clip (module doc)."""
    import random
    import shutil
    import tempfile

    from faster_whisper import WhisperModel

    from label import random_model  # a model folder as training leaves it, random weights

    from langid.audio import load_audio
    from langid.config import FeatureConfig
    from langid.whisper import model_folder

    clips = commonvoice_clips(a.shared)
    languages = sorted({lang for _, lang, _ in clips})
    sample = sorted(random.Random(a.seed).sample(range(len(clips)), min(a.whisper_clips, len(clips))))
    tmp = tempfile.mkdtemp(prefix="langid-bench-student-")
    try:
        cfg = FeatureConfig()
        model = random_model(os.path.join(tmp, "student"), cfg, labels=languages, arch="resnet18")
        listing = os.path.join(tmp, "clips.txt")
        with open(listing, "w", encoding="utf-8") as f:
            f.writelines(p + "\n" for p, _, _ in clips)
        audios = [load_audio(clips[i][0], 16000).samples for i in sample]
        folder = model_folder(a.model)
        facts = machine_facts(model=a.model, threads=a.threads, clips=len(clips), whisper_clips=len(sample))
        facts.update(wait_for_quiet(a.max_load, up_to=a.max_wait, log=lambda m: print(m, file=sys.stderr, flush=True)))

        print(f"the label job on {len(clips)} clips (a fresh process and Ray) ...", file=sys.stderr, flush=True)
        load_job = load_averages()
        job = run_cli_label(model, listing, os.path.join(tmp, "labels.csv"))
        job["load_before"], job["load_after"] = load_job, load_averages()
        print(f"  {job['wall']:.1f} s for {job['files']} clips", file=sys.stderr, flush=True)

        print(f"detect_language on {len(sample)} of them ...", file=sys.stderr, flush=True)
        load_whisper = load_averages()
        t0 = time.perf_counter()
        baseline = WhisperModel(folder, device="cpu", compute_type="int8", cpu_threads=a.threads)
        whisper_load_s = time.perf_counter() - t0
        answers, whisper_s = timed(lambda x: baseline.detect_language(x)[0], audios)
        whisper_acc = sum(p == clips[i][1] for p, i in zip(answers, sample)) / len(sample)
        print(f"  {whisper_s:.3f} s per clip", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    facts["load_at_end"] = load_averages()
    data = {"facts": facts, "job": job, "sample": sample, "whisper_answers": answers, "whisper_load_s": whisper_load_s,
            "whisper_s_per_clip": whisper_s, "whisper_accuracy": whisper_acc, "load_whisper": load_whisper,
            "settings": {"model": a.model, "threads": a.threads, "seed": a.seed, "clips": len(clips),
                         "mean_clip_s": sum(d for _, _, d in clips) / len(clips),
                         "mean_sample_s": sum(clips[i][2] for i in sample) / len(sample)}}
    md = render_student(data)
    paths = write_results("whisper_student", md, data)
    print(md)
    print(f"written: {paths[0]}, {paths[1]}")
    return 0


def render_student(data: dict) -> str:
    """The --student report from its data (also stored in `data`: the table's rows); --render redoes it."""
    facts, job, st = data["facts"], data["job"], data["settings"]
    whisper_s, n_sample = data["whisper_s_per_clip"], len(data["sample"])
    per_clip = job["wall"] / job["files"]
    steady = 1.0 / job["steady_rows_per_s"] if job.get("steady_rows_per_s") else None
    rows = data["rows"] = [
        {"method": f"faster-whisper detect_language, Whisper-{st['model']} int8, {st['threads']} threads",
         "clips": n_sample, "wall": whisper_s * n_sample, "s_per_clip": whisper_s, "speedup": 1.0,
         "note": f"audio decoded beforehand; model load {data['whisper_load_s']:.1f} s not counted; accuracy "
                 f"{data['whisper_accuracy']:.2f}", "load": data["load_whisper"]},
        {"method": "label job, student resnet18 (ONNX), end to end", "clips": job["files"], "wall": job["wall"],
         "s_per_clip": per_clip, "speedup": whisper_s / per_clip,
         "note": f"fresh process + embedded Ray, MP3 decoding included; first rows at {job['first_rows_s']:.1f} s, "
                 f"last rows at {job['last_rows_s']:.1f} s", "load": job["load_before"]},
        {"method": "label job, steady rate (first rows to last rows)", "clips": job["files"] - job["first_rows"],
         "wall": job.get("steady_span_s"), "s_per_clip": steady, "speedup": whisper_s / steady if steady else None,
         "note": "start-up and exit left out", "load": job["load_before"]},
    ]
    verdict = "PASS" if whisper_s / per_clip >= GOAL_STUDENT_SPEEDUP else "MISS"
    table = markdown_table(rows, [("method", "method"), ("clips", "clips"), ("wall", "wall s"),
                                  ("s_per_clip", "s per clip"), ("speedup", "speed-up vs detect_language"),
                                  ("note", "note"), ("load", "load (1, 5, 15 min)")])
    roles = markdown_table([r for r in job["cpu_by_role"] if r["cpu_s"] >= 0.5],
                           [("role", "process (role)"), ("processes", "processes"), ("cpu_s", "CPU s"), ("share", "share")])
    growth = []
    if steady:
        fixed = job["first_rows_s"] + job["tail_s"]
        speedup = lambda n: whisper_s / ((fixed + n * steady) / n)
        growth.append(f"Fixed costs: {job['first_rows_s']:.1f} s from the command's start to the first rows (Python "
                      f"and imports, Ray's start, the job's start-up) and {job['tail_s']:.1f} s from the last rows to "
                      f"the process's exit (publishing, Ray's shutdown); in between {1 / steady:.1f} clips/s. The "
                      "speed-up per clip therefore grows with the archive: " +
                      ", ".join(f"{n:,} clips {speedup(n):.0f}×" for n in (700, 2_000, 10_000, 100_000)) + ".")
        target = GOAL_STUDENT_SPEEDUP
        if whisper_s / steady > target:
            growth.append(f"It reaches {target:g}× from about {fixed / (whisper_s / target - steady):,.0f} clips.")
    cmd = " ".join(os.path.relpath(x, REPO) if x.startswith(REPO) else x for x in job["command"].split()[1:3])
    return "\n".join([
        "# The student through the label job against Whisper's own language detection", "", facts_line(facts), "",
        table, "",
        f"Clips: the {st['clips']} Common Voice clips of ../shared/data/commonvoice (MP3, 7 languages, "
        f"{st['mean_clip_s']:.1f} s on average; one 10-s window each); detect_language on a random sample of "
        f"{n_sample} of them (seed {st['seed']}, {st['mean_sample_s']:.1f} s on average), after one warm-up call. The "
        "student is a resnet18 LangIdNet on 64-mel log-mel windows of 10 s (the default features, as the bootstrap "
        "recipe trains it) with random weights: its speed does not depend on them, its answers mean nothing "
        f"(accuracy not reported). The job ran as a user runs it: `{cmd} ...` in a new process with its own "
        "embedded Ray, on both CPUs (one model actor, decoding in tasks), its wall from the process's start to its "
        "exit. detect_language ran in this process on the same 2 CPUs (int8), its model loaded beforehand and its "
        "audio decoded beforehand, which favours it.", "", *growth, "",
        "## Goal", "",
        f"- {verdict}: the student through the label job, end to end, takes {per_clip * 1000:.0f} ms per clip against "
        f"{whisper_s * 1000:.0f} ms for detect_language: {whisper_s / per_clip:.1f}× faster; goal ≥ "
        f"{GOAL_STUDENT_SPEEDUP:g}×." + (f" Steady rate: {whisper_s / steady:.0f}×." if steady else ""),
        *([f"- {job['errors']} error rows in the job (should be 0)"] if job["errors"] else []), "",
        "## Where the job's CPU went", "", roles])


if __name__ == "__main__":
    sys.exit(main())
