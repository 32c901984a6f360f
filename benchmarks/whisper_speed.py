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
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import facts_line, machine_facts, markdown_table, write_results  # noqa: E402

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
    a = ap.parse_args()

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


if __name__ == "__main__":
    sys.exit(main())
