"""Starting or joining Ray: the same job runs embedded on a laptop and unchanged on a cluster."""
from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from contextlib import contextmanager

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_RUNTIME_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a submitted job
API_SERVER_VARIABLE = "RAY_API_SERVER_ADDRESS"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on loopback now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def init_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False,
             dashboard: bool = False) -> str:
    """Join the cluster at `address` / RAY_ADDRESS, or start Ray embedded; returns which it did.

    Quiet unless `verbose`: Ray's own lines (workers' output, its warnings, the core worker's error lines) stay in
    Ray's session logs instead of the user's terminal. `dashboard` starts the embedded Ray's dashboard, which
    Ray Train needs (its state API); the other jobs start faster without it.
    """
    import ray

    if ray.is_initialized():
        return "already running"
    quiet_ray_data()
    if not verbose:
        quiet_ray()
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR)
    # workers must import langid even when it is run from a checkout rather than installed
    env = {"PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)}
    if address:
        if JOB_RUNTIME_ENV not in os.environ:  # a job sent with `ray job submit --working-dir` has its code already,
            kwargs["runtime_env"] = {"env_vars": env}  # and Ray refuses a driver's env_vars that conflict with it
        with _init_output(verbose):
            ray.init(address=address, **kwargs)
        return f"joined Ray cluster at {address}"
    if dashboard:
        # Ray Train asks the state API (served by the dashboard) whether its controller lives, from inside a
        # worker, where the API's address is otherwise guessed among all Ray instances on the machine: with two
        # (a test beside a job), a wrong guess removed a running training's placement group. So this Ray has its
        # own dashboard, and its workers are told where it is.
        api = f"http://{LOOPBACK}:{free_port()}"
        env[API_SERVER_VARIABLE] = api
        kwargs.update(dashboard_host=LOOPBACK, dashboard_port=int(api.rsplit(":", 1)[1]))
    # Ray ends idle worker processes beyond the node's CPU count within a second, but tasks that take no CPU (the
    # training stream's readers, which run beside workers holding every CPU) then start new ones every epoch,
    # seconds each: a few idle processes are kept instead.
    cpus = num_cpus or os.cpu_count() or 1
    # an embedded Ray's workers inherit the environment its processes start with: given so, rather than as a
    # runtime_env, no runtime-env agent has to set up the first task of each worker (seconds of the start-up)
    with _init_output(verbose), _environment(env):
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard,
                 _system_config={"num_workers_soft_limit": cpus + 10}, **kwargs)
    return f"started Ray embedded ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"


@contextmanager
def _environment(variables: dict):
    """These environment variables while the block runs, the old values after."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _init_output(verbose: bool):
    """While Ray starts, its C++ lines on the process's stderr (such as the log level it read from the
    environment) are held back, and shown only when starting fails."""
    if verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quiet_ray() -> None:
    """Keep Ray's internals out of the terminal: its Python loggers to errors that end the job, its C++ core
    worker's lines (one per actor pool) off, its deprecation warnings off. Before ray.init."""
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    # the driver's thread that prints the raylet's notices ("A worker died...", "the task will be retried") while
    # the job copes with them; they stay in the raylet's log, and a failure that ends the job is raised anyway
    import ray._private.worker as ray_worker

    if hasattr(ray_worker, "listen_error_messages"):
        ray_worker.listen_error_messages = lambda worker, threads_stopped: None


def quiet_ray_data() -> None:
    """Our own progress bar counts files; Ray Data's per-operator bars would only add noise."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
