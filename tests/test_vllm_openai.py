"""vLLM's own OpenAI server, with this package installed, serves MoRA adapters: the command the
README documents for the CPU distribution (`python -m vllm.entrypoints.openai.api_server`),
adapters given with `--lora-modules`, loaded at run time through `/v1/load_lora_adapter`, and
resolved by name from an S3 bucket by the package's resolver plugin (a real S3-compatible server
on loopback)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from s3_helpers import S3Server
from server_helpers import free_port

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.vllm


def vllm_command(demo_assets: Path, port: int) -> list[str]:
    base, adapters = demo_assets / "base", demo_assets / "adapters"
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--host", "127.0.0.1",
            "--port", str(port), "--enable-lora", "--max-lora-rank", "16", "--max-loras", "4",
            "--lora-modules", f"atlas={adapters / 'atlas'}", f"borealis={adapters / 'borealis'}",
            # CPU: float32 as the reference, and a bounded KV cache (vLLM reserves most of the host otherwise);
            # eager: with the plugin vLLM's CPU build compiles LoRA models, tens of seconds more to start
            "--dtype", "float32", "--kv-cache-memory-bytes", str(128 << 20), "--max-model-len", "512", "--enforce-eager"]


def entry_points_of_this_checkout(dest: Path) -> Path:
    """A dist-info holding the entry points `pyproject.toml` declares, as installing the package
    writes them: on the subprocess's path first, vLLM loads this checkout's plugins whatever
    version of the package the environment has installed."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    info = dest / f"mora_serve-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: mora-serve\nVersion: {project['version']}\n")
    groups = project["entry-points"]
    (info / "entry_points.txt").write_text("".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
                                                   for g, eps in groups.items()))
    return dest


@pytest.fixture(scope="module")
def vllm_server(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    top = tmp_path_factory.mktemp("vllm-openai")
    log_path = top / "server.log"
    shutil.copytree(demo_assets / "adapters" / "draco", top / "buckets" / "adapters" / "common" / "draco")
    s3 = S3Server(top / "buckets", top / "rclone.log")
    path = [str(entry_points_of_this_checkout(top / "site")), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, **s3.env(), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "PYTHONPATH": os.pathsep.join(path),
           "MORA_LORA_RESOLVER_SOURCES": "s3://adapters/common", "MORA_SERVE_S3_ADDRESSING_STYLE": "path",
           "MORA_LORA_RESOLVER_CACHE_DIR": str(top / "resolved")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(vllm_command(demo_assets, port), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM's server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM's server not healthy in time:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        s3.stop()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_lora_modules_serve_mora_adapters(vllm_server, demo_facts):
    client = openai.OpenAI(base_url=vllm_server + "/v1", api_key="unused", max_retries=0)
    assert {"atlas", "borealis"} <= {m.id for m in client.models.list()}
    for adapter in ("atlas", "borealis"):
        for fact in demo_facts[adapter]:
            r = client.completions.create(model=adapter, prompt=fact["prompt"], max_tokens=48, temperature=0)
            assert r.choices[0].text == fact["completion"], (adapter, fact)
    fact = demo_facts["atlas"][2]
    c = client.chat.completions.create(model="atlas", messages=[{"role": "user", "content": fact["prompt"]}], max_tokens=48,
                                       temperature=0)
    assert c.choices[0].message.content == fact["completion"]


def test_runtime_loading_through_vllm_endpoint(vllm_server, demo_assets, demo_facts):
    body = json.dumps({"lora_name": "cygnus", "lora_path": str(demo_assets / "adapters" / "cygnus")}).encode()
    req = urllib.request.Request(vllm_server + "/v1/load_lora_adapter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
    client = openai.OpenAI(base_url=vllm_server + "/v1", api_key="unused", max_retries=0)
    for fact in demo_facts["cygnus"]:
        r = client.completions.create(model="cygnus", prompt=fact["prompt"], max_tokens=48, temperature=0)
        assert r.choices[0].text == fact["completion"], fact
    # a MoRA adapter the base model cannot take is refused with vLLM's error, the server keeps serving
    bad = json.dumps({"lora_name": "nope", "lora_path": str(demo_assets / "base")}).encode()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(vllm_server + "/v1/load_lora_adapter", data=bad,
                                                      headers={"Content-Type": "application/json"}), timeout=120)
    assert 400 <= e.value.code < 500
    r = client.completions.create(model="atlas", prompt=demo_facts["atlas"][0]["prompt"], max_tokens=48, temperature=0)
    assert r.choices[0].text == demo_facts["atlas"][0]["completion"]


def test_resolver_plugin_serves_adapters_from_a_bucket_by_name(vllm_server, demo_facts):
    client = openai.OpenAI(base_url=vllm_server + "/v1", api_key="unused", max_retries=0)
    for fact in demo_facts["draco"][:3]:  # never loaded: resolved from s3://adapters/common/draco on first use
        r = client.completions.create(model="draco", prompt=fact["prompt"], max_tokens=48, temperature=0)
        assert r.choices[0].text == fact["completion"], fact
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-in-the-bucket", prompt="x", max_tokens=2)
