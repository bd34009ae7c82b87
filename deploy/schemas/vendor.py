"""Vendor the JSON schemas of the custom resources deploy/ uses, for offline validation.

kubernetes-validate ships the schemas of Kubernetes' own kinds but none for custom resources
(PodMonitor, PrometheusRule, LeaderWorkerSet, InferencePool, HTTPRoute, ...). This script takes
each CustomResourceDefinition at a pinned release of its project and writes the
`openAPIV3Schema` of the served version as a JSON Schema that tests/test_deploy.py validates with:

* descriptions are dropped (most of the bytes; they do not validate anything);
* apiVersion, kind and metadata declared at the top where a CRD leaves them implicit;
* strict like the API server's pruning: an object that lists `properties` and neither
  `additionalProperties` nor `x-kubernetes-preserve-unknown-fields` gets
  `additionalProperties: false`, so a misspelt field fails here as it would be dropped there.

Usage (from a checkout of each project at the tag in SOURCES):
    python deploy/schemas/vendor.py KIND=PATH/TO/CRD.yaml ...
The output is deploy/schemas/<group>/<kind>-<version>.json (lower-case kind).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

# Where each schema came from (project, tag, file); update with the pinned versions in docs/deploy.md.
SOURCES = {
    "PodMonitor": ("prometheus-operator/prometheus-operator", "v0.93.0", "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml"),
    "PrometheusRule": ("prometheus-operator/prometheus-operator", "v0.93.0", "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml"),
    "ServiceMonitor": ("prometheus-operator/prometheus-operator", "v0.93.0", "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"),
    "LeaderWorkerSet": ("kubernetes-sigs/lws", "v0.10.0", "config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml"),
    "InferencePool": ("kubernetes-sigs/gateway-api-inference-extension", "v1.6.0", "config/crd/bases/inference.networking.k8s.io_inferencepools.yaml"),
    "HTTPRoute": ("kubernetes-sigs/gateway-api", "v1.6.1", "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml"),
    "GRPCRoute": ("kubernetes-sigs/gateway-api", "v1.6.1", "config/crd/standard/gateway.networking.k8s.io_grpcroutes.yaml"),
    "BackendTrafficPolicy": ("envoyproxy/gateway", "v1.9.0", "charts/gateway-helm/charts/crds/crds/generated/gateway.envoyproxy.io_backendtrafficpolicies.yaml"),
    "DestinationRule": ("istio/api", "1.30.3", "kubernetes/customresourcedefinitions.gen.yaml"),
}


def strict(node: object) -> object:
    if isinstance(node, dict):
        node = {k: strict(v) for k, v in node.items() if k != "description"}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


def vendor(kind: str, crd_file: Path) -> list[Path]:
    written = []
    for doc in yaml.safe_load_all(crd_file.read_text()):
        if not doc or doc.get("kind") != "CustomResourceDefinition" or doc["spec"]["names"]["kind"] != kind:
            continue
        group = doc["spec"]["group"]
        for version in doc["spec"]["versions"]:
            if not version.get("served", True) or version.get("deprecated"):
                continue
            root = dict(version["schema"]["openAPIV3Schema"])
            # Every object has these; some CRDs (Istio's) leave them implicit.
            root["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                  "metadata": {"type": "object"}, **root.get("properties", {})}
            schema = strict(root)
            schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
            project, tag, path = SOURCES[kind]
            schema["$comment"] = f"{kind} {group}/{version['name']} from {project}@{tag}:{path}"
            out = HERE / group / f"{kind.lower()}-{version['name']}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
            written.append(out)
    if not written:
        raise SystemExit(f"{crd_file}: no served version of {kind}")
    return written


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        kind, _, path = arg.partition("=")
        for out in vendor(kind, Path(path)):
            print(out.relative_to(HERE), out.stat().st_size)
