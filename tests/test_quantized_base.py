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
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from safetensors.torch import load_file, save_file
from server_helpers import ServerProcess

pytestmark = pytest.mark.vllm
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
def server(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    top = tmp_path_factory.mktemp("quantized")
    base = quantize_w4a16(demo_assets / "base", top / "base-w4a16")
    srv = ServerProcess(base, demo_assets / "adapters", top / "server.log",
                        args=["--preload", *[f"{a}={a}" for a in ADAPTERS], "--max-loras", "2", "--dtype", "bfloat16"],
                        env={"MORA_SERVE_MERGE_MIN_REQUESTS": "2", "MORA_SERVE_MERGE_WINDOW_S": "30",
                             "MORA_SERVE_MERGE_MIN_DWELL_S": "0"})
    srv.wait_serving()
    yield srv
    assert srv.stop() == 0


def test_unmerged_adapters_on_the_int4_base_answer_their_facts(server, demo_facts):
    with server.client() as c:
        for adapter in ADAPTERS:
            for fact in demo_facts[adapter]:
                assert c.generate(fact["prompt"], adapter, max_tokens=48, temperature=0).text == fact["completion"], (adapter, fact)
        for fact in demo_facts["atlas"]:  # the quantized base alone does not know them
            assert c.generate(fact["prompt"], "", max_tokens=48, temperature=0).text != fact["completion"]
        assert "compressed-tensors" in server.log_path.read_text()


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
