"""Build cluster/schemas/kuberay-v1.json: JSON Schemas for the manifests in cluster/.

The output holds one ``$defs`` table with a root per kind (``RayJob``, ``RayService``, ``RayCluster``,
``ConfigMap``, ``PersistentVolumeClaim``) and everything they reference. Two sources go into it:

* Kubernetes core v1 types (PodSpec, Container, Service, ConfigMap, PersistentVolumeClaim, ...): the OpenAPI
  definitions of Kubernetes v1.33 as shipped in the PyPI package ``kubernetes-validate==1.37.0``
  (``kubernetes_validate/kubernetes-json-schema/v1.33.0-local-strict/_definitions.json``). The "strict" variant
  sets ``additionalProperties: false`` on every object, which matches what the API server does with unknown
  fields of a structural schema (it prunes or, with ``kubectl apply --validate=strict``, rejects them).
* The ray.io parts (RayJobSpec, RayServiceSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec,
  AutoscalerOptions) are transcribed below from KubeRay's generated CRDs in github.com/ray-project/kuberay,
  ``helm-chart/kuberay-operator/crds/``:
    - ``ray.io_rayjobs.yaml`` at commit 037e91b0e311e6240431a4dcb111fab341a6f613 (controller-gen v0.15.0):
      RayJobSpec and the RayClusterSpec it embeds;
    - ``ray.io_rayservices.yaml`` at commit 02a80a6f2abf691f2f4e89e4b7c47672bc259b5c (controller-gen v0.16.5):
      RayServiceSpec. Its ``rayClusterConfig`` uses the RayClusterSpec field set above; newer operators add
      optional fields (authOptions, gcsFaultToleranceOptions, ...) that these manifests do not use, and the
      required lists of both commits agree (head: rayStartParams, template; worker: groupName, minReplicas,
      maxReplicas, rayStartParams, template).
  Types, enums, defaults and ``required`` lists are copied; descriptions are left out. ``format: int32`` is
  kept for reference (jsonschema does not enforce it). Every ray.io object gets ``additionalProperties: false``:
  the CRDs do not say it, but the API server prunes unknown fields of a structural schema, so a misspelt key
  (``shutdownAfterJobFinish``) would be dropped silently; the strict check turns that into a test failure.
  Quantities use the CRD form (integer, or a string matching the Kubernetes quantity pattern).
  ``apiVersion``/``kind`` are pinned to ``ray.io/v1`` and the kind, and ``metadata.name`` is required.

Regenerate (needs only the standard library):

    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv && unzip -q /tmp/kv/*.whl -d /tmp/kv
    python cluster/schemas/build.py \\
        /tmp/kv/kubernetes_validate/kubernetes-json-schema/v1.33.0-local-strict/_definitions.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("kuberay-v1.json")
CORE = "io.k8s.api.core.v1."
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)

# ----------------------------------------------------------------------------- ray.io parts (from the CRDs)


def _ref(name: str) -> dict:
    return {"$ref": f"#/$defs/{name}"}


def _obj(props: dict, required: list[str] | None = None) -> dict:
    out = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    return out


INT32 = {"type": "integer", "format": "int32"}
STR = {"type": "string"}
BOOL = {"type": "boolean"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _list(item: dict) -> dict:
    return {"type": "array", "items": item}


RAY_DEFS = {
    # The CRD embeds ObjectMeta in templates with generateEmbeddedObjectMeta: only these five fields survive.
    "EmbeddedObjectMeta": _obj(
        {
            "annotations": STR_MAP,
            "finalizers": _list(STR),
            "labels": STR_MAP,
            "name": STR,
            "namespace": STR,
        }
    ),
    "PodTemplateSpec": _obj({"metadata": _ref("EmbeddedObjectMeta"), "spec": _ref(CORE + "PodSpec")}),
    "AutoscalerOptions": _obj(
        {
            "env": _list(_ref(CORE + "EnvVar")),
            "envFrom": _list(_ref(CORE + "EnvFromSource")),
            "idleTimeoutSeconds": INT32,
            "image": STR,
            "imagePullPolicy": STR,
            "resources": _ref(CORE + "ResourceRequirements"),
            "securityContext": _ref(CORE + "SecurityContext"),
            "upscalingMode": {"type": "string", "enum": ["Default", "Aggressive", "Conservative"]},
            "volumeMounts": _list(_ref(CORE + "VolumeMount")),
        }
    ),
    "HeadGroupSpec": _obj(
        {
            "enableIngress": BOOL,
            "headService": _ref(CORE + "Service"),
            "rayStartParams": STR_MAP,
            "serviceType": STR,
            "template": _ref("PodTemplateSpec"),
        },
        required=["rayStartParams", "template"],
    ),
    "WorkerGroupSpec": _obj(
        {
            "groupName": STR,
            "maxReplicas": {**INT32, "default": 2147483647},
            "minReplicas": {**INT32, "default": 0},
            "numOfHosts": {**INT32, "default": 1},
            "rayStartParams": STR_MAP,
            "replicas": {**INT32, "default": 0},
            "scaleStrategy": _obj({"workersToDelete": _list(STR)}),
            "template": _ref("PodTemplateSpec"),
        },
        required=["groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"],
    ),
    "RayClusterSpec": _obj(
        {
            "autoscalerOptions": _ref("AutoscalerOptions"),
            "enableInTreeAutoscaling": BOOL,
            "headGroupSpec": _ref("HeadGroupSpec"),
            "headServiceAnnotations": STR_MAP,
            "rayVersion": STR,
            "suspend": BOOL,
            "workerGroupSpecs": _list(_ref("WorkerGroupSpec")),
        },
        required=["headGroupSpec"],
    ),
    "RayJobSpec": _obj(
        {
            "activeDeadlineSeconds": INT32,
            "backoffLimit": {**INT32, "default": 0},
            "clusterSelector": STR_MAP,
            "entrypoint": STR,
            "entrypointNumCpus": {"type": "number"},
            "entrypointNumGpus": {"type": "number"},
            "entrypointResources": STR,
            "jobId": STR,
            "metadata": STR_MAP,
            "rayClusterSpec": _ref("RayClusterSpec"),
            "runtimeEnvYAML": STR,
            "shutdownAfterJobFinishes": BOOL,
            "submissionMode": {"type": "string", "default": "K8sJobMode"},
            "submitterConfig": _obj({"backoffLimit": INT32}),
            "submitterPodTemplate": _ref("PodTemplateSpec"),
            "suspend": BOOL,
            "ttlSecondsAfterFinished": {**INT32, "default": 0},
        }
    ),
    "RayServiceSpec": _obj(
        {
            "deploymentUnhealthySecondThreshold": INT32,
            "excludeHeadPodFromServeSvc": BOOL,
            # The CRD states this as a CEL rule: self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue'].
            "managedBy": {"type": "string", "enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
            "rayClusterConfig": _ref("RayClusterSpec"),
            "serveConfigV2": STR,
            "serveService": _ref(CORE + "Service"),
            "serviceUnhealthySecondThreshold": INT32,
        }
    ),
}


def _top(kind: str, spec: str) -> dict:
    return {
        "type": "object",
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"allOf": [_ref("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")], "required": ["name"]},
            "spec": _ref(spec),
            "status": {"type": "object"},
        },
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
    }


ROOTS = {
    "RayJob": _top("RayJob", "RayJobSpec"),
    "RayService": _top("RayService", "RayServiceSpec"),
    "RayCluster": _top("RayCluster", "RayClusterSpec"),
    "ConfigMap": _ref(CORE + "ConfigMap"),
    "PersistentVolumeClaim": _ref(CORE + "PersistentVolumeClaim"),
}

# ----------------------------------------------------------------------------- core v1 closure


def _strip(node):
    """Drop descriptions; keep everything that constrains a value."""
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _refs(node, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            found.add(ref.removeprefix("#/$defs/"))
        for v in node.values():
            _refs(v, found)
    elif isinstance(node, list):
        for v in node:
            _refs(v, found)


def build(definitions: Path) -> dict:
    core = json.loads(definitions.read_text())["$defs"]
    defs: dict = {**RAY_DEFS, **ROOTS}
    todo: set[str] = set()
    _refs(defs, todo)
    while todo:
        name = todo.pop()
        if name in defs:
            continue
        defs[name] = _strip(core[name])
        more: set[str] = set()
        _refs(defs[name], more)
        todo |= more - defs.keys()
    defs["io.k8s.apimachinery.pkg.api.resource.Quantity"] = {
        "anyOf": [{"type": "integer"}, {"type": "string", "pattern": QUANTITY_PATTERN}]
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "Generated by cluster/schemas/build.py; see its docstring for sources and versions.",
        "$defs": dict(sorted(defs.items())),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    schema = build(Path(argv[1]))
    OUT.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB, {len(schema['$defs'])} definitions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
