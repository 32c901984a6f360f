"""Shared helpers for the benchmarks: machine facts, timing, and writing a results table."""
from __future__ import annotations

import datetime
import json
import os
import platform
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

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


def process_tree() -> list[psutil.Process]:
    """This process and every process it started (an embedded Ray's raylet, GCS and workers)."""
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def tree_cpu_seconds() -> dict[int, float]:
    """CPU seconds of this process and each descendant, by pid."""
    out = {}
    for p in process_tree():
        with suppress(psutil.Error):  # the process ended meanwhile
            times = p.cpu_times()
            out[p.pid] = times.user + times.system
    return out


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


# ---------------------------------------------------------------- a shared machine: load, rows, CPU per role

def load_averages() -> str:
    """The 1-, 5- and 15-minute load averages, e.g. "1.02 0.87 0.55"."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def wait_for_quiet(max_load: float, every: float = 60.0, up_to: float = 600.0, log=print) -> dict:
    """Before a measurement on a machine others use: wait (checking every `every` s, at most `up_to` s) until the
    1-minute load average is at most `max_load`. Returns the loads seen and the seconds waited; measures anyway
    when the load stays high (the loads recorded say so)."""
    t0, seen = time.monotonic(), [load_averages()]
    while os.getloadavg()[0] > max_load and time.monotonic() - t0 < up_to:
        log(f"load average {seen[-1]} above {max_load}: waiting {every:.0f} s "
            f"({time.monotonic() - t0:.0f} of at most {up_to:.0f} s waited)")
        time.sleep(every)
        seen.append(load_averages())
    return {"waited_s": round(time.monotonic() - t0, 1), "loads_seen": seen, "load_at_start": load_averages(),
            "quiet": os.getloadavg()[0] <= max_load}


class RowClock(Poller):
    """Watches a CSV being appended to (a job's `<output>.partial`): when rows arrive, from the count of newlines
    in the bytes appended since the last look (cheap: no re-reading, no CSV parsing; for rows without newlines in
    fields). `timeline` holds (perf_counter, rows) at each change; the header line does not count."""

    def __init__(self, path: str, every: float = 0.1):
        super().__init__(every)
        self.path = path
        self.timeline: list[tuple[float, int]] = []
        self._offset, self._lines, self._inode = 0, 0, None

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                if inode != self._inode:  # a new file (or rewritten): count from its start
                    self._inode, self._offset, self._lines = inode, 0, 0
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        self._lines += data.count(b"\n")
        rows = max(0, self._lines - 1)
        if rows and (not self.timeline or rows > self.timeline[-1][1]):
            self.timeline.append((time.perf_counter(), rows))

    def phases(self, t0: float, end: float, total_rows: int) -> dict:
        """Start-up (start to first rows), steady rate (first rows to last rows, in rows/s) and tail (last rows to
        the end) of a run that started at t0 and ended at `end` with `total_rows` rows; steady is None when fewer
        than half the rows came after the first ones or the span is under a second (two bursts, not a rate)."""
        if not self.timeline:
            return {"first_rows_s": None, "first_rows": 0, "steady_rows_per_s": None, "tail_s": None}
        (t1, n1), (t2, n2) = self.timeline[0], self.timeline[-1]
        steady = (n2 - n1) / (t2 - t1) if n1 <= total_rows / 2 and t2 - t1 >= 1.0 else None
        return {"first_rows_s": t1 - t0, "first_rows": n1, "steady_rows_per_s": steady, "steady_span_s": t2 - t1,
                "last_rows_s": t2 - t0, "tail_s": end - t2,
                "timeline": [(round(t - t0, 2), n) for t, n in self.timeline[:: max(1, len(self.timeline) // 200)]]}


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def ray_role(pid: int, cmdline: str) -> str:
    """What a process of an embedded Ray's tree is doing, from its command line (Ray workers set it to
    `ray::<what they run>`): 'driver' for this process."""
    if pid == os.getpid():
        return "driver (this process)"
    if cmdline.startswith("ray::"):
        what = cmdline.split()[0][5:]
        return "idle Ray worker" if what in ("IDLE", "") else f"ray::{what}"
    if "default_worker.py" in cmdline:
        return "Ray worker starting (imports, before its first task)"
    for name in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "client"):
        if name in cmdline:
            return f"Ray system: {name}"
    words = cmdline.split()
    return "other: " + " ".join(os.path.basename(w) for w in words[:2]) if words else "other"


class CpuByRole(Poller):
    """CPU seconds the process tree used while the block ran, per role (ray_role of each process at the time it
    used them: a worker that ran reading tasks and then decoding tasks counts under each), sampled every `every` s.
    `.seconds` after the block: {role: CPU s}; `.pids`: {role: [pids]}."""

    def __init__(self, every: float = 0.5):
        super().__init__(every)
        self.seconds: dict[str, float] = {}
        self.pids: dict[str, set] = {}
        self._last: dict[int, float] = {}
        self._roles: dict[int, str] = {}

    def poll(self):
        for pid, cpu in tree_cpu_seconds().items():
            role = ray_role(pid, _cmdline(pid))
            if role == "idle Ray worker" and pid in self._roles:
                role = self._roles[pid]  # its last work is what it just used CPU for
            self._roles[pid] = role
            first = pid not in self._last
            used = cpu - self._last.get(pid, cpu if first and self._started_before(pid) else 0.0)
            self._last[pid] = cpu
            if used > 0:
                self.seconds[role] = self.seconds.get(role, 0.0) + used
            self.pids.setdefault(role, set()).add(pid)

    def _started_before(self, pid: int) -> bool:
        return pid in self._before

    def __enter__(self):
        self._before = set(tree_cpu_seconds())  # processes already there: only their CPU from now counts
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.poll()

    def table(self) -> list[dict]:
        total = sum(self.seconds.values()) or 1.0
        return [{"role": role, "cpu_s": s, "share": s / total, "processes": len(self.pids.get(role, ()))}
                for role, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])]
