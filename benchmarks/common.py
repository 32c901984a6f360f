"""Shared helpers for the benchmarks: machine facts, timing, and writing a results table."""
from __future__ import annotations

import datetime
import json
import os
import platform
import threading
import time
from contextlib import contextmanager
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_count() -> int:
    """CPUs this process may run on (what Ray and a process pool would get)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_average() -> str:
    """1-minute load average; on a shared machine it tells how noisy the numbers are."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def machine_facts(**extra) -> dict:
    """CPU count, Python and library versions, date, plus what the benchmark adds."""
    import librosa
    import numpy
    import ray

    facts = {
        "cpus": cpu_count(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "librosa": librosa.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(terse=True),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_at_start": load_average(),
    }
    facts.update(extra)
    return facts


def facts_line(facts: dict) -> str:
    """One Markdown line with the machine facts."""
    return " · ".join(f"{k.replace('_', ' ')}: {v}" for k, v in facts.items())


@contextmanager
def stopwatch(times: dict, key: str, clock=time.process_time):
    """Add the seconds spent inside the block to times[key]; CPU time by default (robust to sharing)."""
    t0 = clock()
    try:
        yield
    finally:
        times[key] = times.get(key, 0.0) + clock() - t0


@contextmanager
def clocks(out: dict):
    """Put the block's wall seconds and this process's CPU seconds into out['wall'], out['cpu']."""
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        yield out
    finally:
        out["wall"], out["cpu"] = time.perf_counter() - w0, time.process_time() - c0


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of `rows`, with (key, header) `columns`; floats get 2 significant decimals."""
    def cell(v):
        if v is None:
            return "–"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, markdown: str, data: dict) -> tuple[Path, Path]:
    """Write results/<name>.md and results/<name>.json; returns both paths."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    md, js = RESULTS_DIR / f"{name}.md", RESULTS_DIR / f"{name}.json"
    md.write_text(markdown + "\n")
    js.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return md, js


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used) for every process, read from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def tree_cpu_seconds() -> dict[int, float] | None:
    """CPU seconds of this process and each descendant (Ray's raylet, GCS and workers), or None off Linux."""
    if not os.path.isdir("/proc"):
        return None
    stats = _proc_stats()
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return {pid: stats[pid][1] for pid in tree if pid in stats}


def cpu_used_since(before: dict[int, float] | None) -> float | None:
    """CPU seconds the process tree used since `before` (processes that started since count in full)."""
    after = tree_cpu_seconds()
    if before is None or after is None:
        return None
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


class Poller:
    """Calls self.poll() every `every` seconds in a background thread while the `with` block runs."""

    def __init__(self, every: float):
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def poll(self):
        raise NotImplementedError

    def _run(self):
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
