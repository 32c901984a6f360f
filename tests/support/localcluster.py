"""A real multi-node Ray cluster on one machine: a head and worker nodes as separate `ray start` processes.

Each node is its own raylet with its own resources, joined over loopback exactly as machines join a cluster,
so jobs reach it the way they reach a cloud cluster: `ray job submit --address http://HEAD:PORT`. Used by the
multi-node test and the scaling benchmark; also a way to try the cluster path before paying for one.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from langid.runtime import API_SERVER_VARIABLE, LOOPBACK, REPO_ROOT, free_port


class ClusterError(RuntimeError):
    """The local cluster did not come up, or a submitted job failed."""


class LocalCluster:
    """Context manager: `nodes[0]` is the head, each further dict a worker node's resources (CPU, GPU, custom)."""

    def __init__(self, nodes: Sequence[dict] = ({"CPU": 1}, {"CPU": 1}), start_timeout: float = 120.0,
                 object_store_bytes: int = 1 << 30):
        self.nodes = [dict(n) for n in nodes]
        self.object_store_bytes = object_store_bytes  # per node; Ray's default (30% of RAM) is sized for one node
        self.start_timeout = start_timeout
        bin_dir = os.path.dirname(sys.executable)
        self.env = {**os.environ,
                    # every node, driver and CLI call carries the cluster's token, as Ray asks of real clusters
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        for name in ("RAY_ADDRESS", API_SERVER_VARIABLE):  # this cluster's, not the caller's Ray
            self.env.pop(name, None)
        self.procs: list[subprocess.Popen] = []
        self._new_session()

    def _new_session(self) -> None:
        self.port, self.dashboard_port = free_port(), free_port()
        # a short folder: Ray's Unix socket paths live under it and must stay below 108 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="lidc-", dir="/tmp")
        self.logs = os.path.join(self.temp_dir, "logs")

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    def _ray(self) -> str:
        return os.path.join(os.path.dirname(sys.executable), "ray")

    def _start_node(self, i: int, resources: dict) -> None:
        res = dict(resources)
        cpus, gpus = res.pop("CPU", 1), res.pop("GPU", 0)
        cmd = [self._ray(), "start", "--block", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
               f"--resources={json.dumps(res)}", f"--node-ip-address={LOOPBACK}",
               f"--object-store-memory={self.object_store_bytes}",
               # every node on this machine needs its own agent ports; Ray's defaults are fixed numbers
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               # each node its own session folder, as on separate machines: a node's runtime-env cleanup must
               # not delete files another node's processes work in
               f"--temp-dir={os.path.join(self.temp_dir, f'n{i}')}", "--disable-usage-stats"]
        if i == 0:
            cmd += ["--head", f"--port={self.port}", "--include-dashboard=true",
                    f"--dashboard-host={LOOPBACK}", f"--dashboard-port={self.dashboard_port}",
                    f"--ray-client-server-port={free_port()}"]
        else:
            cmd += [f"--address={self.address}"]
        os.makedirs(self.logs, exist_ok=True)
        with open(os.path.join(self.logs, f"node{i}.log"), "wb") as log:
            # its own process group: teardown stops this node's raylet and workers, nothing else on the machine
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               cwd=REPO_ROOT, start_new_session=True))

    def ray_cli(self, *args: str, timeout: float = 60.0) -> str:
        """Run a `ray` subcommand against this cluster; its stdout."""
        r = subprocess.run([self._ray(), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise ClusterError(f"ray {' '.join(args[:2])} failed: {(r.stderr or r.stdout).strip()[-2000:]}")
        return r.stdout

    def alive_nodes(self) -> list[dict]:
        out = self.ray_cli("list", "nodes", f"--address={self.dashboard}", "--format=json",
                           "--filter", "state=ALIVE")
        return json.loads(out)

    def _wait_for(self, n_nodes: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            dead = [i for i, p in enumerate(self.procs) if p.poll() is not None]
            if dead:
                raise ClusterError(f"node {dead[0]} exited while starting: {self._log_tail(dead[0])}")
            try:
                if len(self.alive_nodes()) >= n_nodes:
                    return
            except (ClusterError, subprocess.TimeoutExpired, ValueError):
                pass  # the dashboard is not up yet
            if time.monotonic() > deadline:
                raise ClusterError(f"{n_nodes} nodes not up after {self.start_timeout:.0f} s: {self._log_tail(0)}")
            time.sleep(1.0)

    def _log_tail(self, i: int, lines: int = 5) -> str:
        try:
            with open(os.path.join(self.logs, f"node{i}.log"), errors="replace") as f:
                return " | ".join(f.read().strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "LocalCluster":
        for attempt in (1, 2):  # a port picked here can be taken by the time Ray binds it: one more try
            try:
                self._start_node(0, self.nodes[0])
                self._wait_for(1)
                for i, res in enumerate(self.nodes[1:], start=1):
                    self._start_node(i, res)
                self._wait_for(len(self.nodes))
                return self
            except ClusterError:
                self.close()
                if attempt == 2:
                    raise
                self._new_session()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, args: Sequence[str], timeout: float = 600.0, working_dir: Optional[str] = REPO_ROOT,
               env_vars: Optional[dict] = None) -> str:
        """`ray job submit` a command (e.g. ["jobs/preprocess.py", ...]) with this Python; its output, or ClusterError."""
        cmd = [self._ray(), "job", "submit", f"--address={self.dashboard}"]
        if working_dir:
            cmd.append(f"--working-dir={working_dir}")
        if env_vars:
            cmd.append(f"--runtime-env-json={json.dumps({'env_vars': env_vars})}")
        cmd += ["--", sys.executable, *args]
        try:
            r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"job {' '.join(args[:1])} still running after {timeout:.0f} s") from None
        if r.returncode != 0:
            raise ClusterError(f"job {' '.join(args[:1])} failed:\n{(r.stderr + r.stdout)[-20000:]}")
        return r.stderr + r.stdout  # the job's own output last

    def close(self) -> None:
        """Stop every node (workers first), waiting for their process groups; then remove the session folder."""
        for p in reversed(self.procs):
            _stop_group(p, signal.SIGTERM)
        # a graceful stop takes Ray ~30 s per node; a few seconds, then the group is killed (its state dies with it)
        deadline = time.monotonic() + 5
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _stop_group(p, signal.SIGKILL)  # stragglers of the group (workers outliving their raylet)
        self.procs = []
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _stop_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
