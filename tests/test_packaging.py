"""Packaging: every third-party module the code imports is a declared dependency of the right kind."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the project's packages, and the test helpers that tests import as top-level modules (pytest puts tests/ on sys.path)
OWN = {"mora", "serve", "bench", "tests", "generate", *(p.stem for p in (REPO / "tests").glob("*.py"))}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0])


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {_requirement_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    runtime |= {_requirement_name(r) for r in extras["cpu"] + extras["gpu"]}  # vLLM: one of the two
    dev = runtime | {_requirement_name(r) for r in extras["dev"]}
    return runtime, dev


def _imports(paths: list[Path]) -> dict[str, str]:
    """top-level module -> first file importing it (absolute imports only)."""
    found: dict[str, str] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                found.setdefault(n.split(".")[0], str(path.relative_to(REPO)))
    return found


def _undeclared(paths: list[Path], declared: set[str]) -> list[str]:
    dists = packages_distributions()
    missing = []
    for module, where in sorted(_imports(paths).items()):
        if module in sys.stdlib_module_names or module in OWN or module == "__future__":
            continue
        candidates = {_norm(d) for d in dists.get(module, [])}
        assert candidates, f"{module} (imported by {where}) is not installed"
        if not candidates & declared:
            missing.append(f"{module} (imported by {where}; distribution {sorted(candidates)})")
    return missing


def _py(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in (REPO / d).rglob("*.py") if "_proto" not in p.parts]


def test_runtime_imports_are_declared_dependencies():
    runtime, _ = _declared()
    assert _undeclared(_py("mora", "serve"), runtime) == []


def test_test_and_bench_imports_are_declared_dev_dependencies():
    _, dev = _declared()
    assert _undeclared(_py("tests", "bench"), dev) == []


def test_runtime_does_not_need_build_tools():
    """Stubs are generated when the package is built or installed: running it needs no protoc."""
    assert "grpc_tools" not in _imports(_py("mora", "serve")), "grpcio-tools is a build-time tool"
    runtime, _ = _declared()
    assert "grpcio-tools" not in runtime


# --- the locks -------------------------------------------------------------------------------

LOCKS = {"cpu.txt": ("cpu",), "cpu-dev.txt": ("cpu", "dev"), "gpu.txt": ("gpu",), "gpu-dev.txt": ("gpu", "dev")}


def _lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """package -> (version, hashes) of requirements/<name>."""
    text = (REPO / "requirements" / name).read_text()
    out = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        if m:
            out[_norm(m.group(1))] = (m.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return out


def test_locks_cover_every_declared_requirement_with_hashes():
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for name, extras in LOCKS.items():
        lock = _lock(name)
        assert lock and all(hashes for _, hashes in lock.values()), f"{name}: every package needs its sha256"
        wanted = list(project["dependencies"]) + [r for e in extras for r in project["optional-dependencies"][e]]
        for req in map(Requirement, wanted):
            assert _norm(req.name) in lock, f"{name} lacks {req.name}: run `make lock`"
            version = lock[_norm(req.name)][0]
            assert req.specifier.contains(version, prereleases=True), f"{name}: {req.name}=={version} violates {req}: run `make lock`"
        for broken in ("torchvision", "torchaudio", "torchcodec"):  # built for another torch: break transformers
            assert broken not in lock, name
    assert _lock("cpu.txt")["torch"][0].endswith("+cpu") and not _lock("gpu.txt")["torch"][0].endswith("+cpu")


def test_build_uses_the_locked_stub_generator():
    """The stubs need a protobuf runtime at least as new as the protoc that generated them."""
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    tools = next(r for r in build if r.startswith("grpcio-tools"))
    assert tools.startswith("grpcio-tools==")
    assert tools.split("==")[1] == _lock("cpu-dev.txt")["grpcio-tools"][0] == _lock("gpu-dev.txt")["grpcio-tools"][0]


def test_installs_use_the_locks_and_name_the_torch_cpu_index():
    index = "https://download.pytorch.org/whl/cpu"
    makefile = (REPO / "Makefile").read_text()
    assert f"TORCH_INDEX ?= {index}" in makefile
    assert "LOCK      := requirements/$(VLLM_EXTRA)-dev.txt" in makefile
    assert "--require-hashes -r $(LOCK)" in makefile and "--extra-index-url $(TORCH_INDEX)" in makefile
    cpu = (REPO / "Dockerfile.cpu").read_text()
    assert f"ARG TORCH_INDEX={index}" in cpu and "--require-hashes --extra-index-url \"${TORCH_INDEX}\" -r requirements/cpu.txt" in cpu
    # the images' Python is the one their lock was made for
    assert "--python-version 3.11" in (REPO / "requirements" / "cpu.txt").read_text().splitlines()[1]
    assert "python:3.11" in cpu
    assert "--python-version 3.12" in (REPO / "requirements" / "gpu.txt").read_text().splitlines()[1]
    assert "python3.12 -m venv" in (REPO / "Dockerfile").read_text()
    assert index in (REPO / "README.md").read_text()


# --- the gRPC stubs --------------------------------------------------------------------------

def test_stubs_in_the_tree_are_current(tmp_path):
    sys.path.insert(0, str(REPO / "protos"))
    try:
        from generate import generate
    finally:
        sys.path.remove(str(REPO / "protos"))
    generate(tmp_path / "_proto")
    fresh = {p.relative_to(tmp_path / "_proto"): p.read_bytes() for p in (tmp_path / "_proto").rglob("*.py*")}
    current = REPO / "serve" / "_proto"
    assert {p: (current / p).read_bytes() for p in fresh} == fresh, "run `python protos/generate.py`"


def test_a_built_wheel_carries_the_stubs(tmp_path):
    """Built wheels (the images install one) contain serve/_proto; nothing is generated at run time."""
    import shutil
    import subprocess
    import zipfile

    tree = tmp_path / "src"  # a copy without serve/_proto, as in a fresh clone
    tree.mkdir()

    for item in ("pyproject.toml", "setup.py", "README.md", "protos", "mora", "serve"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, tree / item, ignore=shutil.ignore_patterns("_proto", "__pycache__"))
        else:
            shutil.copy(src, tree / item)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(tree)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("mora_serve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for m in ("inference_pb2", "inference_pb2_grpc", "adapters_pb2", "adapters_pb2_grpc"):
        assert f"serve/_proto/mora/v1/{m}.py" in names
    assert not any(n.startswith("protos/") for n in names)
    assert "mora/kernels/native/grouped_mm.cpp" in names  # the native CPU kernel is built where it runs
