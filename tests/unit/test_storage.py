"""The shared-storage check's parts that need no cluster: which folders every node must see, how a node reads the
probes, and which nodes and folders the error names. The check itself runs on a real two-node cluster in
tests/integration/test_run_job.py, where a worker node that cannot see the run's folders fails the job at start."""

from __future__ import annotations

import sys
import types
from pathlib import Path

from pipeline.config import load_config
from pipeline.storage import check_shared_storage, read_probes, shared_paths, unseen

NODES = [{"NodeID": "aaa", "NodeManagerAddress": "10.0.0.1"}, {"NodeID": "bbb", "NodeManagerAddress": "10.0.0.2"}]


def test_shared_paths_are_the_run_dir_and_a_local_storage_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, overrides=["output_root=runs", "name=r"])
    assert shared_paths(cfg) == {"output_root": tmp_path / "runs" / "r"}  # relative to where the driver runs
    local = load_config(None, overrides=["train.storage_path=~/ckpt"])
    assert shared_paths(local)["train.storage_path"] == Path.home() / "ckpt"
    cloud = load_config(None, overrides=["train.storage_path=s3://bucket/ckpt"])
    assert list(shared_paths(cloud)) == ["output_root"]  # Ray Train reaches a URI from every node itself


def test_read_probes_reports_missing_files_as_none(tmp_path):
    (tmp_path / "p").write_text("token")
    assert read_probes([str(tmp_path / "p"), str(tmp_path / "missing"), str(tmp_path)]) == ["token", None, None]


def test_unseen_names_node_folder_and_field(tmp_path):
    probes = {"output_root": (tmp_path / "runs" / "r" / ".probe-1", "t1"),
              "train.storage_path": (tmp_path / "ckpt" / ".probe-2", "t2")}
    assert unseen(NODES, probes, {"aaa": ["t1", "t2"], "bbb": ["t1", "t2"]}) == []
    assert unseen(NODES, probes, {"aaa": ["t1", "t2"], "bbb": [None, "t2"]}) == [
        f"node 10.0.0.2 (id bbb) cannot see {tmp_path / 'runs' / 'r'} (output_root)"]
    # a folder of the same name on another filesystem holds another probe text
    assert unseen(NODES, probes, {"aaa": ["t1", "other"], "bbb": None}) == [
        f"node 10.0.0.1 (id aaa) cannot see {tmp_path / 'ckpt'} (train.storage_path)",
        "node 10.0.0.2 (id bbb) did not answer the storage probe"]


def _fake_ray(monkeypatch, *, up: bool, nodes: list[dict]) -> list:
    """A stand-in ``ray`` module (Ray up or not, these nodes) and a recorder of init_ray calls."""
    started = []
    fake = types.SimpleNamespace(is_initialized=lambda: up or bool(started), nodes=lambda: nodes)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr("pipeline.runtime.init_ray", lambda **kw: started.append(kw))
    return started


def test_without_a_cluster_nothing_is_started_or_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = _fake_ray(monkeypatch, up=False, nodes=NODES)
    assert check_shared_storage(load_config(None, overrides=[f"output_root={tmp_path}"])) == 0
    assert started == [] and not any(tmp_path.iterdir())  # a run starts its own one-node Ray later


def test_one_alive_node_has_nothing_to_check(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    started = _fake_ray(monkeypatch, up=False, nodes=[{**NODES[0], "Alive": True}, {**NODES[1], "Alive": False}])
    assert check_shared_storage(load_config(None, overrides=[f"output_root={tmp_path}"])) == 1
    assert [kw["address"] for kw in started] == [None]  # joins $RAY_ADDRESS, as every stage does
    assert not any(tmp_path.iterdir())
