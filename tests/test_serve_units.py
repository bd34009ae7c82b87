"""Server components without the engine: merge policy, settings, tenants, error mapping, paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import pytest

from mora.errors import NonFiniteMergeError, ShapeMismatchError
from serve.adapters.policy import MergePolicy
from serve.adapters.validation import check_adapter_id, resolve_under_root
from serve.config import ServerSettings, load_settings, parse_args
from serve.errors import AdapterNotFound, PathNotAllowed, status_for
from serve.tenants import TenantDirectory, hash_key


def policy(**kw):
    args = dict(window_s=10, merge_share=0.9, unmerge_share=0.6, min_requests=5, min_dwell_s=2)
    return MergePolicy(**(args | kw))


def test_policy_merges_dominant_adapter_and_unmerges_on_mix():
    p = policy()
    for i in range(9):
        p.observe("a", i * 0.1)
    p.observe("b", 1.0)
    d = p.decide(1.1, None, lambda a: True)
    assert d and d.action == "merge" and d.adapter_id == "a" and d.share == pytest.approx(0.9)
    p.transitioned(1.1)
    for i in range(10):
        p.observe("b", 2 + i * 0.1)
    assert p.decide(2.5, "a", lambda a: True) is None  # dwell time not over
    d = p.decide(3.5, "a", lambda a: True)
    assert d and d.action == "unmerge" and d.adapter_id == "a"


def test_policy_hysteresis_window_and_guards():
    p = policy()
    for i in range(10):
        p.observe("a", i * 0.1)
    assert p.decide(1.0, None, lambda a: False) is None  # ineligible (LoRA, manual, unloading)
    assert p.decide(1.0, "a", lambda a: True, manual=["a"]) is None
    p2 = policy()
    for i in range(8):
        p2.observe("a", i * 0.1)
    for i in range(2):
        p2.observe("b", 1 + i * 0.1)
    assert p2.decide(2.0, None, lambda a: True) is None  # 80% < 90%: no merge
    assert p2.decide(2.0, "a", lambda a: True) is None  # 80% > 60%: stays merged (hysteresis)
    assert p2.decide(100.0, "a", lambda a: True) is None  # idle window: nothing changes
    p3 = policy()
    for i in range(3):
        p3.observe("a", i)
    assert p3.decide(3, None, lambda a: True) is None  # too few requests
    p4 = policy()
    for i in range(10):
        p4.observe(None, i * 0.1)
    assert p4.decide(1.0, None, lambda a: True) is None  # the base model is never "merged"
    with pytest.raises(ValueError):
        policy(merge_share=0.5, unmerge_share=0.6)


def test_settings_precedence_flags_env_file(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: /m\nadapter_root: /r\nport: 1111\nmetrics_port: 2222\nmax_loras: 8\nmax_cpu_loras: 16\n")
    monkeypatch.setenv("MORA_SERVE_PORT", "3333")
    cli, path = parse_args(["--config", str(cfg), "--max-loras", "2"])
    s = load_settings(cli, path)
    assert (s.port, s.metrics_port, s.max_loras, s.model) == (3333, 2222, 2, Path("/m"))
    monkeypatch.setenv("MORA_SERVE_PRELOAD", '["a=x"]')
    assert load_settings({"model": "/m", "adapter_root": "/r"}).preload_map == {"a": "x"}


@pytest.mark.parametrize("bad", [{"max_lora_rank": 7}, {"max_loras": 8, "max_cpu_loras": 4}, {"merge_share": 0.5, "unmerge_share": 0.7},
                                 {"tls_cert": "/x"}, {"preload": ["noequals"]}, {"port": 70000}, {"dtype": "int8"}, {"bogus": 1}])
def test_settings_validation_names_the_problem(bad):
    with pytest.raises(ValueError) as e:
        ServerSettings(model="/m", adapter_root="/r", **bad)
    assert any(k in str(e.value) for k in [*bad, "max_cpu_loras", "unmerge_share", "tls"])


def test_tenants_file_and_constant_time_auth(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"tenants": [
        {"name": "a", "key_sha256": hash_key("ka"), "adapters": ["x"]},
        {"name": "ops", "key_sha256": hash_key("kops"), "role": "admin"},
    ]}))
    d = TenantDirectory.from_file(f)
    assert d.authenticate([("authorization", "Bearer ka")]).name == "a"
    assert d.authenticate([("authorization", "bearer kops")]).is_admin
    for md in ([], [("authorization", "Bearer nope")], [("authorization", "Basic ka")]):
        with pytest.raises(Exception) as e:
            d.authenticate(md)
        assert status_for(e.value)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert d.owner_of("x") == "a"
    assert "ka" not in f.read_text()  # keys are stored hashed
    assert not d.may_see(d.get("a"), "someone-else") and d.may_see(d.get("a"), "a")  # callers answer NOT_FOUND
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"tenants": [{"name": "a", "key_sha256": hash_key("k"), "adapters": ["x"]},
                                           {"name": "b", "key_sha256": hash_key("k2"), "adapters": ["x"]}]}))
    with pytest.raises(ValueError, match="listed by tenants"):
        TenantDirectory.from_file(dup)
    assert TenantDirectory.from_file(None).authenticate([]).is_admin  # open server


def test_error_mapping_is_specific():
    assert status_for(AdapterNotFound("x"))[0] == grpc.StatusCode.NOT_FOUND
    assert status_for(ShapeMismatchError("bad", adapter="a", module="m", expected=[1, 1], found=[2, 2])) == (
        grpc.StatusCode.INVALID_ARGUMENT, "adapter 'a', module 'm': bad (expected [1, 1], found [2, 2])")
    assert status_for(NonFiniteMergeError("x"))[0] == grpc.StatusCode.FAILED_PRECONDITION
    code, message = status_for(KeyError("secret internals"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message


def test_paths_are_confined_to_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "link")
    os.symlink(root / "ok", root / "inner-link")
    assert resolve_under_root(root, "ok") == (root / "ok").resolve()
    assert resolve_under_root(root, "inner-link") == (root / "ok").resolve()
    for bad in ("../outside", "/etc", "link", "ok/../../outside"):
        with pytest.raises(PathNotAllowed):
            resolve_under_root(root, bad)
    for bad in ("", "nope", "a\x00b"):
        with pytest.raises(Exception) as e:
            resolve_under_root(root, bad)
        assert status_for(e.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
    for bad_id in ("", "a/b", "..", "x" * 129, "a b"):
        with pytest.raises(Exception) as e:
            check_adapter_id(bad_id)
        assert status_for(e.value)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_proto_lint_with_buf():
    import shutil
    import subprocess

    buf = shutil.which("buf") or str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "buf")
    proc = subprocess.run([buf, "lint"], cwd=Path(__file__).resolve().parent.parent / "protos", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_client_sends_the_routing_header():
    from serve.client import MoraClient

    with MoraClient("127.0.0.1:1", api_key="k") as c:
        assert c.metadata_for("atlas") == (("authorization", "Bearer k"), ("x-mora-adapter", "atlas"), ("x-llm-d-model-name-rewrite", "atlas"))
        assert c.metadata_for("") == (("authorization", "Bearer k"), ("x-mora-adapter", "base"), ("x-llm-d-model-name-rewrite", "base"))
        assert c.metadata_for("ünï\n") == (("authorization", "Bearer k"),)  # not a valid header value: no routing


@pytest.mark.parametrize(("answer", "error"), [
    ([{"mora_layers": 8}, {"mora_layers": 8}], None),
    ([{"mora_layers": 8}, {"mora_layers": 0}], "without the MoRA layer wrappers"),
    (RuntimeError("Worker failed with error 'MoRA is not active in this engine', please check"), "started without MoRA"),
], ids=["installed", "a worker without wrappers", "stock vLLM"])
def test_engine_refuses_to_serve_without_the_mora_wrappers(answer, error, monkeypatch, tmp_path):
    """After vLLM starts, every worker must run the MoRA wrappers (a plugin that failed to import,
    or VLLM_PLUGINS without `mora`, leaves vLLM stock): otherwise `Engine.start` fails, and the
    server with it, before SERVING."""
    import asyncio

    from vllm.v1.engine.async_llm import AsyncLLM

    from serve.engine import Engine

    class FakeLLM:
        errored = False
        model_config = None  # start() stops at the check or reads this

        async def collective_rpc(self, method, args=()):
            assert method == "mora_status"
            if isinstance(answer, Exception):
                raise answer
            return answer

        def get_tokenizer(self):
            raise LookupError("past the check")

        def shutdown(self):
            pass

    ipc_base = []
    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    monkeypatch.setattr(AsyncLLM, "from_engine_args",
                        classmethod(lambda cls, args: ipc_base.append(os.environ.get("VLLM_RPC_BASE_PATH")) or FakeLLM()))
    engine = Engine(load_settings(*parse_args(["--model", str(tmp_path), "--adapter-root", str(tmp_path)])))
    with pytest.raises(LookupError if error is None else RuntimeError, match=error or "past the check"):
        asyncio.run(engine.start())
    # vLLM's IPC sockets go to a private folder while it starts; the variable does not outlive
    # the start (a server this process spawns later gets its own), the folder the engine
    assert "VLLM_RPC_BASE_PATH" not in os.environ
    assert ipc_base[0] and Path(ipc_base[0]).is_dir() and Path(ipc_base[0]).name.startswith("mora-ipc-")
    engine.shutdown()
    assert not Path(ipc_base[0]).exists()
