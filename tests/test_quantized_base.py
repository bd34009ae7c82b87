"""MoRA adapters on a quantized base model.

vLLM's CPU build runs two weight-quantization schemes: int8 W8A8 (compressed-tensors
`int-quantized`, oneDNN) and 4-bit W4A16 (compressed-tensors `pack-quantized`, GPTQ, AWQ: the
CPUWNA16 kernel). With LoRA enabled only W4A16 works: on CPUs without AMX the W8A8 kernel releases
the layer's `weight` after packing it for oneDNN, and vLLM's LoRA wrapper then fails at start-up
reading `base_layer.weight.device` (vllm/lora/layers/utils.py `_get_lora_device`). The W4A16
kernel runs in bfloat16 only ("cpu_gemm_wna16 not implemented for 'Float'"), and needs input and
output sizes that are multiples of 32: the demo's MLP (688) is left in bfloat16, its attention
projections are quantized (int4, symmetric, groups of 32), here from the demo base.

Adapters are served unmerged (the quantized GEMM plus the MoRA update); merging is refused with
FAILED_PRECONDITION, because adding a float update to 4-bit codes would need a re-quantization
that changes the base and makes the unmerge inexact.

The W4A16 kernel (`torch.ops._C.cpu_gemm_wna16`) exists only in vLLM's AVX-512 kernel libraries:
on an AVX2-only CPU the serving tests skip, naming it, and on every CPU the server, shown that
CPU (tests/emulate_cpu), refuses to start on this base instead of dying at its first request.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import grpc
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from cpu_features import emulated_avx2_env, requires_vllm_cpu_op
from grpc_health.v1 import health_pb2
from safetensors.torch import load_file, save_file
from server_helpers import ServerProcess

pytestmark = pytest.mark.vllm
needs_w4a16_kernel = requires_vllm_cpu_op("cpu_gemm_wna16", "serving a W4A16 (int4) base on the CPU")
EXIT_STARTUP_FAILED = 2
ADAPTERS = ["atlas", "cygnus"]
GROUP = 32


def quantize_w4a16(src: Path, dst: Path) -> Path:
    """`src` with its attention projections in int4 (symmetric, one scale per GROUP inputs), in
    compressed-tensors' `pack-quantized` layout (what llm-compressor writes for W4A16)."""
    shutil.copytree(src, dst)
    out = {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        if ".self_attn." in name and name.endswith("_proj.weight"):
            rows, cols = w.shape
            groups = w.reshape(rows, cols // GROUP, GROUP)
            scale = groups.abs().amax(dim=2).clamp(min=1e-8) / 7.0
            q = torch.round(groups / scale[..., None]).clamp(-8, 7).to(torch.int8).reshape(rows, cols)
            prefix = name.removesuffix("weight")
            out[prefix + "weight_packed"] = pack_to_int32(q, 4)
            out[prefix + "weight_scale"] = scale.float()
            out[prefix + "weight_shape"] = torch.tensor([rows, cols])
        else:
            out[name] = w
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP, "dynamic": False}}},
        "ignore": ["lm_head", "re:.*mlp.*"],
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture(scope="module")
def w4a16_base(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_w4a16(demo_assets / "base", tmp_path_factory.mktemp("quantized") / "base-w4a16")


@pytest.fixture(scope="module")
def server(w4a16_base: Path, demo_assets: Path):
    srv = ServerProcess(w4a16_base, demo_assets / "adapters", w4a16_base.parent / "server.log",
                        args=["--preload", *[f"{a}={a}" for a in ADAPTERS], "--max-loras", "2", "--dtype", "bfloat16"],
                        env={"MORA_SERVE_MERGE_MIN_REQUESTS": "2", "MORA_SERVE_MERGE_WINDOW_S": "30",
                             "MORA_SERVE_MERGE_MIN_DWELL_S": "0"})
    srv.wait_serving()
    yield srv
    assert srv.stop() == 0


def test_a_cpu_without_the_int4_kernel_refuses_to_start(w4a16_base: Path, demo_assets: Path):
    """On a CPU whose vLLM kernels lack the W4A16 GEMM (AVX2: here shown to the server by
    tests/emulate_cpu, on an AVX2 machine its own), mora-serve exits with the start-up failure
    code, naming the quantization and what the CPU lacks, and never reports SERVING."""
    srv = ServerProcess(w4a16_base, demo_assets / "adapters", w4a16_base.parent / "refused.log",
                        args=["--preload", "atlas=atlas", "--dtype", "bfloat16"], env=emulated_avx2_env())
    seen = set()
    deadline = time.monotonic() + 300
    while srv.proc.poll() is None and time.monotonic() < deadline:
        seen.add(srv.health())
        time.sleep(0.2)
    code = srv.stop()
    log = srv.log_path.read_text()
    assert code == EXIT_STARTUP_FAILED, log[-3000:]
    assert health_pb2.HealthCheckResponse.SERVING not in seen
    refusal = next(line for line in log.splitlines() if "QuantizationUnsupportedError: " in line)
    for words in ("compressed-tensors", "CompressedTensorsWNA16", "cpu_gemm_wna16", "AVX-512F", "vllm._C_AVX2"):
        assert words in refusal, refusal


@needs_w4a16_kernel
def test_unmerged_adapters_on_the_int4_base_answer_their_facts(server, demo_facts):
    with server.client() as c:
        for adapter in ADAPTERS:
            for fact in demo_facts[adapter]:
                assert c.generate(fact["prompt"], adapter, max_tokens=48, temperature=0).text == fact["completion"], (adapter, fact)
        for fact in demo_facts["atlas"]:  # the quantized base alone does not know them
            assert c.generate(fact["prompt"], "", max_tokens=48, temperature=0).text != fact["completion"]
        assert "compressed-tensors" in server.log_path.read_text()


@needs_w4a16_kernel
def test_merge_is_refused_with_the_reason_and_serving_continues(server, demo_facts):
    with server.client() as c:
        with pytest.raises(grpc.RpcError) as e:
            c.merge_adapter("atlas")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "quantized" in e.value.details()
        # single-adapter traffic does not make the automatic policy try either
        fact = demo_facts["atlas"][0]
        for _ in range(4):
            assert c.generate(fact["prompt"], "atlas", max_tokens=48, temperature=0).text == fact["completion"]
        assert not c.get_adapter("atlas").merged
    assert "merge policy" not in server.log_path.read_text()
