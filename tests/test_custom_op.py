"""The project's Python custom ops are registered directly with the dispatcher (`custom_op.py`):
no per-call autograd or in-place-or-view wrapper, a schema that names what each op writes, and
results under `torch.compile` equal to eager."""

from __future__ import annotations

import pytest
import torch

import bench.gpu_model  # noqa: F401  (registers mora_bench::stock_lora)
import mora.kernels.fused_op  # registers mora::fused_apply
import mora.vllm_plugin.layers  # noqa: F401  (registers mora::stock_lora, mora::stock_embedding)
from mora.kernels.custom_op import direct_op

NAMESPACES = ("mora::", "mora_bench::")
WRAPPER_KEYS = ("Autograd", "AutogradCPU", "AutogradCUDA", "ADInplaceOrView")


def _project_ops() -> list[str]:
    names = sorted({n.split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith(NAMESPACES)})
    return names


def test_every_project_op_is_registered_without_a_per_call_wrapper():
    """`torch.library.custom_op` adds Python autograd and in-place-or-view kernels that run on
    every call (~20 us each, 1-2 calls per wrapped layer per step in a compiled model)."""
    ops = _project_ops()
    assert {"mora::fused_apply", "mora::stock_lora", "mora::stock_embedding", "mora_bench::stock_lora"} <= set(ops)
    for name in ops:
        wrappers = [k for k in WRAPPER_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
        assert not wrappers, f"{name} has per-call wrapper kernels {wrappers}: register it with direct_op"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd"), name


def test_schemas_name_the_arguments_each_op_writes():
    assert "Tensor(a0!) y" in str(torch.ops.mora.fused_apply.default._schema)
    assert "Tensor(a0!) y" in str(torch.ops.mora.stock_lora.default._schema)
    assert "!" not in str(torch.ops.mora.stock_embedding.default._schema)


@direct_op("mora_test::axpy", mutates_args=("y",))
def _axpy(y: torch.Tensor, x: torch.Tensor, scale: float) -> None:
    y.add_(x, alpha=scale)


@_axpy.register_fake
def _axpy_fake(y: torch.Tensor, x: torch.Tensor, scale: float) -> None:
    return None


def test_a_direct_op_mutates_in_place_under_compile_as_in_eager():
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x * 2
        torch.ops.mora_test.axpy(y, h, 0.5)
        return y + 1

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        for n in (3, 7):
            x = torch.randn(n, 5)
            y_eager, y_comp = torch.zeros(n, 5), torch.zeros(n, 5)
            out_eager, out_comp = step(x, y_eager), compiled(x, y_comp)
            assert torch.equal(y_comp, y_eager) and torch.equal(out_comp, out_eager)
    assert _axpy.qualname == "mora_test::axpy"


@pytest.mark.parametrize("name", ["axpy", "::axpy", "mora_test::", ""])
def test_an_unqualified_name_is_refused(name: str):
    with pytest.raises(ValueError, match="namespace::name"):
        direct_op(name, mutates_args=())
