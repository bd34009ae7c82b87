"""The OpenAI-compatible HTTP API and the matching gRPC features (n, logprobs, chat), on one live
server with the real vLLM engine, called with the official `openai` client and gRPC stubs."""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import grpc
import openai
import pytest
from engine_helpers import hf_greedy_scored, random_lora, random_mora
from pydantic import BaseModel
from server_helpers import ServerProcess, metric_value, write_tenants
from transformers import AutoTokenizer

from serve.grpc.proto import inference_pb2 as ipb
from serve.http import HTTP_STATUS

pytestmark = pytest.mark.vllm
DEMO = ["atlas", "borealis", "cygnus"]
OWNER = {"atlas": "acme", "borealis": "globex", "cygnus": "initech"}
SYSTEM = "Answer tersely."


@pytest.fixture(scope="module")
def server(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    top = tmp_path_factory.mktemp("http")
    root = top / "adapters"
    root.mkdir()
    for name in DEMO:
        shutil.copytree(demo_assets / "adapters" / name, root / name)
    random_mora(demo_assets / "base", root / "rand", mora_type=6, r=4, seed=7, scale=0.08)
    random_lora(demo_assets / "base", root / "lora", seed=5)
    keys = write_tenants(top / "tenants.json", {
        "acme": {"adapters": ["atlas", "rand", "lora"]},
        "globex": {"adapters": ["borealis"]},
        "initech": {"adapters": ["cygnus"], "allow_base_model": False, "max_concurrent_requests": 1},
        "ops": {"role": "admin"},
    })
    srv = ServerProcess(demo_assets / "base", root, top / "server.log", args=[
        "--tenants", str(top / "tenants.json"), "--no-auto-merge", "--max-loras", "4",
        "--preload", *[f"{a}={a}" for a in (*DEMO, "rand", "lora")], "--engine-arg", "max_logprobs=8",
        # JSON without free whitespace: the demo model, memorizing facts, would spend its tokens on it
        "--structured-output-backend", "xgrammar", "--structured-output-compact-json",
    ], holdable=True)
    srv.wait_serving()
    srv.keys = keys
    srv.root = root
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def oai(server):
    """An OpenAI client per tenant (no retries: a status is the server's own answer)."""
    return {name: openai.OpenAI(base_url=server.http_url, api_key=key, max_retries=0, timeout=120)
            for name, key in server.keys.items()}


def _fact(demo_facts, adapter: str, i: int = 0) -> dict[str, str]:
    return demo_facts[adapter][i]


def test_completions_and_chat_equal_the_reference(oai, demo_facts):
    for adapter in DEMO:
        client = oai[OWNER[adapter]]
        for fact in demo_facts[adapter][:2]:
            r = client.completions.create(model=adapter, prompt=fact["prompt"], max_tokens=48, temperature=0)
            assert r.choices[0].text == fact["completion"], (adapter, fact)
            assert r.choices[0].finish_reason == "stop" and r.object == "text_completion"
            # the demo chat template renders a user turn exactly as the completion prompt
            c = client.chat.completions.create(model=adapter, messages=[{"role": "user", "content": fact["prompt"]}],
                                               max_tokens=48, temperature=0)
            assert c.choices[0].message.content == fact["completion"] and c.choices[0].message.role == "assistant"
            assert c.usage.prompt_tokens == r.usage.prompt_tokens == len(fact["prompt"].encode()) + 1
            assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens


def test_chat_template_with_system_turn_equals_transformers(oai, demo_assets, server):
    tok = AutoTokenizer.from_pretrained(str(demo_assets / "base"))
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "The secret code of harbor is "}]
    prompt = f"{SYSTEM}\nThe secret code of harbor is "
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"] == tok(prompt)["input_ids"]
    (want, margins), = hf_greedy_scored(demo_assets / "base", {"rand": server.root / "rand"}, [(prompt, "rand")], 12)
    assert min(margins) > 1e-3  # no near-tie: the text must match exactly
    with server.client(server.keys["acme"]) as g:
        r = g.chat(messages, "rand", max_tokens=12, temperature=0, ignore_eos=True)
    assert list(r.token_ids) == want
    c = oai["acme"].chat.completions.create(model="rand", messages=messages, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert c.choices[0].message.content == r.text


def test_streaming(oai, demo_facts):
    fact = _fact(demo_facts, "atlas")
    events = list(oai["acme"].completions.create(model="atlas", prompt=fact["prompt"], max_tokens=48, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(e.choices[0].text for e in events if e.choices)
    assert text == fact["completion"] and len(events) > 3
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "stop"
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == len(fact["completion"].encode()) + 1  # + </s>
    chunks = list(oai["acme"].chat.completions.create(model="atlas", messages=[{"role": "user", "content": fact["prompt"]}],
                                                      max_tokens=48, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == fact["completion"]


def test_n_and_seed(oai, demo_facts):
    fact = _fact(demo_facts, "borealis")
    r = oai["globex"].completions.create(model="borealis", prompt=fact["prompt"], max_tokens=48, temperature=0, n=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and all(c.text == fact["completion"] for c in r.choices)
    assert r.usage.completion_tokens == 3 * (len(fact["completion"].encode()) + 1)
    sampled = [oai["globex"].completions.create(model="borealis", prompt="hello", max_tokens=12, temperature=1.0, n=4, seed=11,
                                                extra_body={"ignore_eos": True}) for _ in range(2)]
    texts = [[c.text for c in sorted(s.choices, key=lambda c: c.index)] for s in sampled]
    assert texts[0] == texts[1], "a seed makes sampling reproducible"
    assert len(set(texts[0])) > 1, "the n samples differ from each other"
    stream = oai["globex"].chat.completions.create(model="borealis", messages=[{"role": "user", "content": fact["prompt"]}],
                                                   max_tokens=48, temperature=0, n=2, stream=True)
    got: dict[int, str] = {}
    for c in stream:
        for ch in c.choices:
            got[ch.index] = got.get(ch.index, "") + (ch.delta.content or "")
    assert got == {0: fact["completion"], 1: fact["completion"]}


def test_logprobs_over_http_and_grpc(server, oai, demo_facts):
    fact = _fact(demo_facts, "atlas")
    r = oai["acme"].completions.create(model="atlas", prompt=fact["prompt"], max_tokens=10, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text == fact["completion"][:10]
    assert len(lp.token_logprobs) == 10 and all(len(t) == 3 for t in lp.top_logprobs)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and top[token] == value == max(top.values())  # greedy: the chosen token is the most likely
    assert lp.text_offset == list(range(10))
    c = oai["acme"].chat.completions.create(model="atlas", messages=[{"role": "user", "content": fact["prompt"]}], max_tokens=10,
                                            temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert [e.token for e in content] == lp.tokens and all(len(e.top_logprobs) == 2 for e in content)
    assert [e.logprob for e in content] == pytest.approx(lp.token_logprobs, abs=1e-5)
    with server.client(server.keys["acme"]) as g:
        resp = g.generate(fact["prompt"], "atlas", max_tokens=10, temperature=0, logprobs=3)
        assert [x.logprob for x in resp.logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)
        assert [x.token_id for x in resp.logprobs] == list(resp.token_ids)
        assert all(len(x.top_logprobs) == 3 and x.top_logprobs[0].token_id == x.token_id for x in resp.logprobs)
        none = g.generate(fact["prompt"], "atlas", max_tokens=4, temperature=0)
        assert len(none.logprobs) == 0


def test_grpc_chat_and_n(server, demo_facts):
    fact = _fact(demo_facts, "cygnus")
    # the admin: initech's quota is one sequence, and quotas count each of n
    with server.client(server.keys["ops"]) as g:
        r = g.chat([{"role": "user", "content": fact["prompt"]}], "cygnus", max_tokens=48, temperature=0, n=2)
        assert r.text == fact["completion"] and [c.text for c in r.completions] == [fact["completion"]] * 2
        assert [c.index for c in r.completions] == [0, 1] and r.usage.completion_tokens == 2 * len(r.token_ids)
        pieces: dict[int, str] = {}
        finished = set()
        for m in g.stream(fact["prompt"], "cygnus", max_tokens=48, temperature=0, n=2):
            pieces[m.index] = pieces.get(m.index, "") + m.text
            if m.finish_reason:
                finished.add(m.index)
        assert pieces == {0: fact["completion"], 1: fact["completion"]} and finished == {0, 1}
        with pytest.raises(grpc.RpcError) as e:
            g.chat([{"role": "wizard", "content": "hi"}], "cygnus", max_tokens=4)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "wizard" in e.value.details()


def test_stop_and_max_tokens(oai, demo_facts):
    fact = _fact(demo_facts, "atlas")
    r = oai["acme"].completions.create(model="atlas", prompt=fact["prompt"], max_tokens=48, temperature=0, stop=["-"])
    assert r.choices[0].text == fact["completion"].split("-")[0] and r.choices[0].finish_reason == "stop"
    r = oai["acme"].completions.create(model="atlas", prompt=fact["prompt"], max_tokens=5, temperature=0, top_p=0.9)
    assert r.choices[0].text == fact["completion"][:5] and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_models_lists_what_the_caller_may_use(server, oai):
    base = Path(server.command[server.command.index("--model") + 1]).name  # the served name, not the path
    assert [m.id for m in oai["acme"].models.list()] == [base, "atlas", "lora", "rand"]
    assert [m.id for m in oai["initech"].models.list()] == ["cygnus"]  # no base model for this tenant
    assert {m.id for m in oai["ops"].models.list()} >= {base, *DEMO}
    r = oai["acme"].completions.create(model=base, prompt="hello", max_tokens=3, temperature=0)
    assert len(r.choices[0].text) > 0


def _grpc_code(server, key, adapter, **sampling) -> grpc.StatusCode:
    with server.client(key) as g:
        try:
            g.generate("hello", adapter, **sampling)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_errors_map_like_grpc(server, oai):
    def status(call) -> int:
        try:
            call()
        except openai.APIStatusError as e:
            assert e.body["code"] and e.body["message"], e.body
            return e.status_code
        return 200

    nobody = openai.OpenAI(base_url=server.http_url, api_key="wrong", max_retries=0)
    assert status(lambda: nobody.completions.create(model="atlas", prompt="x", max_tokens=2)) == 401
    acme = oai["acme"]
    cases = [  # the same request over gRPC and HTTP: the same class of answer
        ("borealis", {}, {}),  # another tenant's adapter
        ("no-such-adapter", {}, {}),
        ("atlas", {"temperature": -1.0}, {"temperature": -1.0}),
        ("atlas", {"n": 50}, {"n": 50}),
        ("atlas", {"logprobs": 20}, {"logprobs": 20}),  # above the engine's max_logprobs=8
    ]
    for adapter, http_kw, grpc_kw in cases:
        code = _grpc_code(server, server.keys["acme"], adapter, max_tokens=2, **grpc_kw)
        assert code != grpc.StatusCode.OK
        got = status(lambda a=adapter, kw=http_kw: acme.completions.create(model=a, prompt="hello", max_tokens=2, **kw))
        assert got == HTTP_STATUS[code], (adapter, http_kw, code)
    assert status(lambda: acme.completions.create(model="atlas", prompt="x", max_tokens=2, extra_body={"bogus": 1})) == 400
    assert status(lambda: acme.chat.completions.create(model="atlas", messages=[], max_tokens=2)) == 400
    assert status(lambda: oai["initech"].completions.create(model=Path(server.command[server.command.index("--model") + 1]).name,
                                                            prompt="x", max_tokens=2)) == 403


def test_quota_is_429_and_shared_with_grpc(server, oai):
    # The engine freezes at the stream's first token: initech's one request stays in flight until
    # release(), however fast the machine.
    server.hold()
    try:
        held = oai["initech"].completions.create(model="cygnus", prompt="hello", max_tokens=480, stream=True,
                                                 extra_body={"ignore_eos": True})
        next(iter(held))
        with pytest.raises(openai.RateLimitError):
            oai["initech"].completions.create(model="cygnus", prompt="hello", max_tokens=2)
        assert _grpc_code(server, server.keys["initech"], "cygnus", max_tokens=2) == grpc.StatusCode.RESOURCE_EXHAUSTED
        held.close()
    finally:
        server.release()


def _http(server, method: str, path: str, key: str, body: dict | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(server.http_url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read().decode()
            return r.status, json.loads(raw) if r.headers.get_content_type() == "application/json" else raw
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def test_admin_endpoints(server, oai, demo_facts):
    ops, acme = server.keys["ops"], server.keys["acme"]
    assert _http(server, "POST", "/adapters", acme, {"adapter_id": "atlas2", "path": "atlas"})[0] == 403
    status, info = _http(server, "POST", "/adapters", ops, {"adapter_id": "atlas2", "path": "atlas", "tenant": "globex"})
    assert status == 200 and info["adapter"]["tenant"] == "globex" and info["adapter"]["kind"] == "ADAPTER_KIND_MORA"
    fact = _fact(demo_facts, "atlas")
    r = oai["globex"].completions.create(model="atlas2", prompt=fact["prompt"], max_tokens=48, temperature=0)
    assert r.choices[0].text == fact["completion"]
    status, listed = _http(server, "GET", "/adapters", server.keys["globex"])
    assert status == 200 and sorted(a["adapter_id"] for a in listed["adapters"]) == ["atlas2", "borealis"]
    status, merged = _http(server, "POST", "/adapters/atlas2/merge", ops)
    assert status == 200 and merged["adapter"]["merged"] is True
    r = oai["globex"].completions.create(model="atlas2", prompt=fact["prompt"], max_tokens=48, temperature=0)
    assert r.choices[0].text == fact["completion"]
    assert _http(server, "POST", "/adapters/atlas2/unmerge", ops, {"automatic": True})[1]["adapter"]["merged"] is False
    assert _http(server, "DELETE", "/adapters/atlas2", ops)[0] == 200
    assert _http(server, "GET", "/adapters/atlas2", ops)[0] == 404
    # vLLM's runtime LoRA endpoints work too
    status, text = _http(server, "POST", "/load_lora_adapter", ops, {"lora_name": "atlas3", "lora_path": "atlas"})
    assert status == 200 and "atlas3" in text
    assert oai["ops"].completions.create(model="atlas3", prompt=fact["prompt"], max_tokens=48, temperature=0).choices[0].text == fact["completion"]
    assert _http(server, "POST", "/unload_lora_adapter", ops, {"lora_name": "atlas3"})[0] == 200


def test_http_requests_are_counted(server, oai, demo_facts):
    fact = _fact(demo_facts, "atlas")
    before = server.scrape()
    list(oai["acme"].completions.create(model="atlas", prompt=fact["prompt"], max_tokens=4, stream=True))
    oai["acme"].chat.completions.create(model="atlas", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.http_url, api_key="nope", max_retries=0).models.list()
    after = server.scrape()
    for method in ("CompletionsStream", "ChatCompletions"):
        labels = {"method": method, "code": "OK", "adapter": "atlas", "tenant": "acme"}
        assert metric_value(after, "mora_requests_total", **labels) == metric_value(before, "mora_requests_total", **labels) + 1


class Verdict(BaseModel):
    """The shape structured requests must answer in (bounded: enums and booleans)."""

    code: Literal["alpha", "beta", "gamma"]
    ok: bool


def test_structured_outputs_on_every_adapter_kind_beside_exact_plain_requests(server, oai, demo_facts):
    base = Path(server.command[server.command.index("--model") + 1]).name
    acme = oai["acme"]
    ask = [{"role": "user", "content": "The secret code of vault is "}]

    def parsed(model: str):
        r = acme.chat.completions.parse(model=model, messages=ask, response_format=Verdict, max_tokens=96, temperature=0)
        return r.choices[0].message.parsed

    def regex(model: str):
        r = acme.completions.create(model=model, prompt="The secret code of vault is ", max_tokens=32, temperature=0,
                                    extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-f]{2}"}})
        return r.choices[0].text

    def choice(model: str):
        r = acme.chat.completions.create(model=model, messages=ask, max_tokens=16, temperature=0,
                                         extra_body={"structured_outputs": {"choice": ["left", "right", "both"]}})
        return r.choices[0].message.content

    def json_object(model: str):
        r = acme.chat.completions.create(model=model, messages=ask, max_tokens=24, temperature=0,
                                         response_format={"type": "json_object"})
        return r.choices[0].message.content  # any object; cut at max_tokens it is a prefix of one

    plain = [(a, f) for a in DEMO for f in demo_facts[a][:2]]
    with ThreadPoolExecutor(16) as pool:  # constrained and plain requests in the same engine steps
        structured = {(kind, m): pool.submit(fn, m) for m in ("atlas", "lora", base)
                      for kind, fn in (("parse", parsed), ("regex", regex), ("choice", choice))}
        structured[("json_object", "rand")] = pool.submit(json_object, "rand")
        answers = [pool.submit(lambda a=a, f=f: oai["ops"].completions.create(  # the admin: no per-tenant quota in the way
            model=a, prompt=f["prompt"], max_tokens=48, temperature=0).choices[0].text) for a, f in plain]
        assert [x.result() for x in answers] == [f["completion"] for _, f in plain]
        for (kind, model), future in structured.items():
            got = future.result()
            if kind == "parse":
                assert isinstance(got, Verdict), model
            elif kind == "regex":
                assert re.fullmatch("[0-9]{3}-[a-f]{2}", got), (model, got)
            elif kind == "choice":
                assert got in ("left", "right", "both"), (model, got)
            else:
                assert got.lstrip().startswith("{"), got
    # merged: a constrained request on a merged MoRA adapter
    with server.client(server.keys["ops"]) as ops:
        ops.merge_adapter("rand")
        try:
            assert isinstance(parsed("rand"), Verdict)
            assert ops.get_adapter("rand").merged
        finally:
            ops.unmerge_adapter("rand", automatic=True)
    # gRPC: the same constraints in SamplingParams
    with server.client(server.keys["acme"]) as g:
        r = g.generate("hello", "atlas", max_tokens=16, temperature=0,
                       structured=ipb.StructuredOutput(choice=ipb.Choices(choices=["yes", "no"])))
        assert r.text in ("yes", "no")
        r = g.generate("hello", "lora", max_tokens=96, temperature=0,
                       structured=ipb.StructuredOutput(json_schema=json.dumps(Verdict.model_json_schema())))
        Verdict.model_validate_json(r.text)


def test_invalid_constraints_are_400_and_the_engine_goes_on(server, oai, demo_facts):
    acme = oai["acme"]

    def refused(**extra) -> str:
        with pytest.raises(openai.BadRequestError) as e:
            acme.completions.create(model="atlas", prompt="hi", max_tokens=4, temperature=0, **extra)
        return e.value.body["message"]

    def fmt(schema) -> dict:  # the completions API takes response_format as vLLM's server does: in the body
        return {"extra_body": {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}}

    deep: dict = {"type": "object"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    cases = [
        (fmt({"type": "objectx"}), "json_schema constraint"),  # vLLM's reason, and which constraint
        (fmt(deep), "nested deeper than 32"),
        (fmt({"type": "object", "description": "x" * (70 << 10)}), "longer than 65536 bytes"),
        ({"extra_body": {"structured_outputs": {"grammar": "root ::= ("}}}, "grammar"),
        ({"extra_body": {"structured_outputs": {"regex": "(a"}}}, "regex"),
        ({"extra_body": {"structured_outputs": {"choice": []}}}, "choice"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "exactly one"),
        ({"extra_body": {"response_format": {"type": "json_schema"}}}, "json_schema"),
        ({"extra_body": {"logit_bias": {"not-a-token": 1}}}, "not a token id"),
        ({"extra_body": {"logit_bias": {"90": 1000}}}, "between -100 and 100"),
    ]
    for extra, named in cases:
        message = refused(**extra)
        assert named in message, (extra, message)
    with server.client(server.keys["acme"]) as g, pytest.raises(grpc.RpcError) as e:
        g.generate("hi", "atlas", max_tokens=4, structured=ipb.StructuredOutput(json_schema="{not json"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "json_schema" in e.value.details()
    fact = demo_facts["atlas"][0]
    assert acme.completions.create(model="atlas", prompt=fact["prompt"], max_tokens=48, temperature=0).choices[0].text == fact["completion"]


def test_logit_bias_and_echo(server, oai, demo_facts):
    fact = demo_facts["atlas"][0]
    z = AutoTokenizer.from_pretrained(Path(server.command[server.command.index("--model") + 1]))("Z", add_special_tokens=False)["input_ids"]
    for model in ("atlas", "lora"):
        r = oai["acme"].completions.create(model=model, prompt=fact["prompt"], max_tokens=6, temperature=0, logit_bias={str(z[0]): 100})
        assert r.choices[0].text == "ZZZZZZ", model
    with server.client(server.keys["acme"]) as g:
        assert g.generate(fact["prompt"], "atlas", max_tokens=3, temperature=0, logit_bias={z[0]: 100}).text == "ZZZ"
    r = oai["acme"].completions.create(model="atlas", prompt=fact["prompt"], max_tokens=48, temperature=0, echo=True)
    assert r.choices[0].text == fact["prompt"] + fact["completion"]
    events = list(oai["acme"].completions.create(model="atlas", prompt=fact["prompt"], max_tokens=48, temperature=0, echo=True,
                                                 stream=True))
    assert "".join(e.choices[0].text for e in events if e.choices) == fact["prompt"] + fact["completion"]
    with pytest.raises(openai.BadRequestError, match="echo with logprobs"):
        oai["acme"].completions.create(model="atlas", prompt="x", max_tokens=2, echo=True, logprobs=1)
