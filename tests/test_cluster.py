"""The cluster path: cluster.yaml passes Ray's own validation, and the three jobs run on a real two-node Ray cluster.

The two nodes are separate `ray start` processes on loopback (tests/support/localcluster.py), each with its own raylet
and resources; the jobs reach them through `ray job submit`, as on a cloud cluster, and their outputs are
compared with the same jobs run on the test session's single-node Ray.
"""
from __future__ import annotations

import copy
import os
import csv
import json
import re

import numpy as np
import pyarrow.compute as pc
import pytest
import yaml

from conftest import REPO
from langid.config import FeatureConfig
from langid.store import Store
from support.localcluster import LocalCluster
from test_training import BANDS, make_corpus


def _validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_passes_rays_validation():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    _validate(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # drivers only; work goes to workers
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values()), "a GPU worker type for training"
    assert any(t["resources"].get("CPU", 0) >= 8 and not t["resources"].get("GPU") for t in types.values())
    assert any("requirements.txt" in c for c in config["setup_commands"])


@pytest.mark.parametrize("break_it, message", [
    (lambda c: c["available_node_types"]["gpu_worker"].pop("resources"), "'resources' is a required property"),
    (lambda c: c.update(head_node_type="nope"), "head_node_type"),
    (lambda c: c["available_node_types"]["cpu_worker"].update(max_workers="six"), "is not of type"),
])
def test_the_validation_catches_a_broken_cluster_yaml(break_it, message):
    """The check above could fail: Ray's validation rejects these edits of our file."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    break_it(config)
    with pytest.raises(Exception, match=message):
        _validate(config)


def test_readme_on_premises_config_passes_rays_validation():
    """The README's local-provider (on-premises) cluster config is a valid Ray config too."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    onprem = [yaml.safe_load(b) for b in blocks if "type: local" in b]
    assert len(onprem) == 1, "README shows one on-premises (local provider) config"
    _validate(onprem[0])
    assert onprem[0]["provider"]["worker_ips"], "it lists the worker machines"


# ---------- the jobs on a real two-node cluster ----------

CFG = FeatureConfig(window_seconds=1.0, n_mels=32)
FEATURE_FLAGS = ["--window-seconds", "1", "--n-mels", "32"]


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    """preprocess -> train (2 workers, one per node) -> label, each a `ray job submit` to a head + worker node."""
    base = tmp_path_factory.mktemp("cluster")
    corpus = make_corpus(base / "corpus", {k: 6 for k in BANDS}, {k: 2 for k in BANDS})
    out = {"base": base, "corpus": corpus, "store": base / "store", "model": base / "model",
           "labels": base / "labels.csv"}
    # two CPUs per node and two per training worker: Ray must place the workers on different nodes
    with LocalCluster([{"CPU": 2, "head_node": 1}, {"CPU": 2, "worker_node": 1}]) as cluster:
        nodes = cluster.alive_nodes()
        out["preprocess_log"] = cluster.submit(
            ["jobs/preprocess.py", "--input", str(corpus), "--output", str(out["store"]), "--batch-size", "4",
             "--quiet", *FEATURE_FLAGS], timeout=600)
        out["train_log"] = cluster.submit(
            ["jobs/train.py", "--store", str(out["store"]), "--output", str(out["model"]), "--arch", "resnet18",
             "--epochs", "1,1,0", "--lr", "1e-2,1e-3,1e-4", "--batch-size", "8", "--workers", "2",
             "--cpus-per-worker", "2", "--no-pretrained", "--quiet"], timeout=900)
        workers = json.loads(cluster.ray_cli("list", "actors", f"--address={cluster.dashboard}", "--format=json",
                                             "--detail", "--limit=1000"))
        out["label_log"] = cluster.submit(
            ["jobs/label.py", "--model", str(out["model"]), "--input", str(corpus / "test" / "test"),
             "--output", str(out["labels"]), "--quiet"], timeout=600)
    out["nodes"] = nodes
    out["train_workers"] = [a for a in workers if a.get("class_name", "").endswith("RayTrainWorker")]
    return out


@pytest.mark.slow
def test_two_separate_nodes_took_part(two_node_run):
    nodes = two_node_run["nodes"]
    assert len(nodes) == 2 and len({n["node_id"] for n in nodes}) == 2
    n = 8 * len(BANDS)
    assert f"{n} files: 0 already in the store, {n} ok" in two_node_run["preprocess_log"]
    # the two training workers ran on different nodes (each node has 2 CPUs, each worker asked for 2)
    workers = two_node_run["train_workers"]
    assert len(workers) >= 2, [a.get("class_name") for a in workers]
    assert len({a["node_id"] for a in workers}) == 2


@pytest.mark.slow
def test_cluster_store_matches_a_single_node_run(two_node_run, ray_local, tmp_path):
    from langid.preprocess import run_preprocess

    res = run_preprocess(str(two_node_run["corpus"]), str(tmp_path / "store"), CFG, batch_size=4, progress=False)
    assert res.failed == 0
    cols = ["path", "split", "language", "recording_id", "window_index", "window_start"]
    a = Store(str(two_node_run["store"])).read().sort_by([("path", "ascending"), ("window_index", "ascending")])
    b = Store(str(tmp_path / "store")).read().sort_by([("path", "ascending"), ("window_index", "ascending")])
    assert a.num_rows == b.num_rows == res.windows > 0
    assert a.select(cols).to_pylist() == b.select(cols).to_pylist()  # same records, same splits, no duplicates
    assert len(set(zip(*(a.column(c).to_pylist() for c in ("path", "window_index"))))) == a.num_rows
    np.testing.assert_array_equal(np.stack(a.column("logmel").to_numpy(zero_copy_only=False)),
                                  np.stack(b.column("logmel").to_numpy(zero_copy_only=False)))
    assert pc.sum(pc.equal(a.column("split"), "valid")).as_py() > 0


@pytest.mark.slow
def test_cluster_trained_model_loads_and_records_both_workers(two_node_run):
    from langid.artifact import load_network

    model, meta = load_network(str(two_node_run["model"]))
    assert meta["labels"] == sorted(BANDS)
    assert meta["training"]["workers"] == 2
    assert meta["feature_config"] == CFG
    with open(two_node_run["model"] / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 2  # one epoch in each of the two stages that had epochs


@pytest.mark.slow
def test_cluster_labels_match_a_single_node_run(two_node_run, ray_local, tmp_path):
    from langid.labeling import run_label

    local = tmp_path / "labels.csv"
    run_label(str(two_node_run["model"]), str(two_node_run["corpus"] / "test" / "test"), str(local), progress=False)
    read = lambda p: {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(open(p))}
    a, b = read(two_node_run["labels"]), read(local)
    assert len(a) == len(b) == 2 * len(BANDS)  # one row per file, none lost, none twice
    assert {k: r["language"] for k, r in a.items()} == {k: r["language"] for k, r in b.items()}
    for k in a:
        assert a[k]["status"] == "ok"
        assert float(a[k]["confidence"]) == pytest.approx(float(b[k]["confidence"]), abs=1e-5)


STATE_PROBE = """
import sys, ray
from langid.runtime import init_ray
init_ray(num_cpus=1, dashboard=True)  # as training starts it: Ray Train's state queries need the dashboard
@ray.remote(num_cpus=0)
class Alive:
    def ping(self):
        return 1
@ray.remote(num_cpus=0)
def alive(actor_id):
    from ray.train.v2._internal.state.util import is_actor_alive  # what Ray Train's placement-group cleaner asks
    return is_actor_alive(actor_id=actor_id, timeout=20)
a = Alive.remote()
ray.get(a.ping.remote())
print("ALIVE", ray.get(alive.remote(a._actor_id.hex())))
"""


def test_embedded_ray_answers_state_queries_about_itself_beside_another_ray(ray_local, tmp_path):
    """With two Ray instances on a machine (here the test session's and a training job's), a worker's state query
    must reach its own Ray: Ray Train removes a training's placement group when its controller looks dead."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    r = subprocess.run([sys.executable, "-c", STATE_PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert "ALIVE True" in r.stdout, (r.stdout + r.stderr)[-3000:]
