"""Every vLLM internal the plugin touches is named in one place (mora/vllm_plugin/coupling.py),
which `register()` checks before the engine starts. This test reads the plugin's code: a private
name (`_x`) of vLLM (or torch) that the plugin touches without listing it fails here."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import mora.vllm_plugin
from mora.vllm_plugin.coupling import INTERNALS

PLUGIN = Path(mora.vllm_plugin.__file__).parent


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _plugin_classes() -> dict[str, type]:
    out = {}
    for info in pkgutil.iter_modules([str(PLUGIN)]):
        module = importlib.import_module(f"mora.vllm_plugin.{info.name}")
        for obj in vars(module).values():
            if inspect.isclass(obj) and obj.__module__ == module.__name__:
                out[obj.__name__] = obj
    return out


def _vllm_bases(cls: type, classes: dict[str, type]) -> list[type]:
    """The vLLM classes `cls` is combined with: its own vLLM bases, or those of our classes that
    mix it in (the layer mixin)."""
    users = [cls] + [c for c in classes.values() if cls in c.__mro__[1:]]
    return [k for c in users for k in c.__mro__ if k.__module__.split(".")[0] == "vllm"]


def _vllm_defines(name: str, bases: list[type]) -> bool:
    for klass in bases:
        if name in vars(klass):
            return True
        try:
            if f"self.{name}" in inspect.getsource(klass):
                return True
        except (OSError, TypeError):
            pass
    return False


def _ours() -> set[str]:
    """Private names the plugin defines itself (methods, attributes it assigns, class fields)."""
    names = set()
    for path in PLUGIN.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                # self.<x> = ... defines <x>; <module>.<x> = ... writes someone else's
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in ("self", "cls"):
                    names.add(t.attr)
                elif isinstance(t, ast.Name):
                    names.add(t.id)
    return names


def touched_private_names() -> dict[str, str]:
    """{private name of someone else's: where the plugin touches it}."""
    classes, ours, found = _plugin_classes(), _ours(), {}
    for path in PLUGIN.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("vllm", "torch"):
                for alias in node.names:
                    if _private(alias.name):
                        found[alias.name] = f"{path.name}: from {node.module} import"
        for cls_node in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
            cls = classes.get(cls_node.name)
            bases = _vllm_bases(cls, classes) if cls is not None else []
            for node in ast.walk(cls_node):
                # a method overriding a vLLM one, or self.<x> that a vLLM base defines
                if isinstance(node, ast.FunctionDef) and _private(node.name) and _vllm_defines(node.name, bases):
                    found[node.name] = f"{path.name}: {cls_node.name}.{node.name} overrides vLLM's"
                if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                        and node.value.id == "self" and _vllm_defines(node.attr, bases)):
                    found[node.attr] = f"{path.name}: {cls_node.name} uses self.{node.attr}, vLLM's"
        for node in ast.walk(tree):
            # <something else>.<_x>: not the plugin's own object, unless the plugin defines _x
            if (isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in ours
                    and not node.attr.startswith("_mora")  # the plugin's prefix on objects it marks
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found[node.attr] = f"{path.name}: .{node.attr}"
    return found


def test_every_private_name_the_plugin_touches_is_listed():
    listed = {i.attr.rsplit(".", 1)[-1] for i in INTERNALS} | {i.calls for i in INTERNALS if i.calls}
    missing = {name: where for name, where in touched_private_names().items() if name not in listed}
    assert not missing, f"list these in mora/vllm_plugin/coupling.py (INTERNALS): {missing}"


def test_the_check_sees_what_it_must():
    """The scan finds the private names it is meant to find (a scan that finds nothing passes anything)."""
    found = touched_private_names()
    for name in ("_registered_adapters", "_adapter_manager", "_unpin", "_enable_aux_cuda_stream", "_all_lora_classes",
                 "_add_adapter", "_load_adapter", "_apply_adapters", "_apply_lora_to_output", "_is_avx512_supported"):
        assert name in found, name
    for name in ("_mora_offsets", "_write_slot", "_preparing", "_staged"):
        assert name not in found, name


def test_list_adapters_override_equals_vllms():
    """`MoraWorkerLoRAManager.list_adapters` (no ordered copy) returns what vLLM's own returns
    for the same host cache (vLLM's `AdapterLRUCache`, filled, touched and evicted as a worker does)."""
    from types import SimpleNamespace

    from vllm.lora.model_manager import AdapterLRUCache, LoRAModelManager
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    from mora.vllm_plugin.worker_manager import MoraWorkerLoRAManager

    cache = AdapterLRUCache(3, lambda _id: None)
    model_manager = SimpleNamespace(_registered_adapters=cache)
    model_manager.list_adapters = lambda: LoRAModelManager.list_adapters(model_manager)
    worker = SimpleNamespace(_adapter_manager=model_manager)
    seen = []
    for step in ([], [7], [7, 9], [9, 7, 11], [12], [7, 13]):
        for lora_id in step:
            if lora_id in cache:
                cache.touch(lora_id)
            else:
                cache.put(lora_id, object())
        ours, stock = MoraWorkerLoRAManager.list_adapters(worker), LRUCacheWorkerLoRAManager.list_adapters(worker)
        assert ours == stock and type(ours) is type(stock)
        seen.append(ours)
    assert seen[-1] == {12, 7, 13} and seen[0] == set()
