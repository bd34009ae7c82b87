"""Makes a process's software see an AVX2-only x86 CPU (no AVX-512, no AMX), on a machine that
has them: for tests of what happens on such CPUs, and to run the whole suite as an AVX2 machine
(e.g. AMD EPYC) runs it (README, "Testing as an AVX2-only CPU runs").

Put this folder on `PYTHONPATH` with `MORA_EMULATE_CPU=avx2`; Python imports it at start-up,
before anything imports torch. Then:

* vLLM's CPU platform loads its AVX2 kernel library (`vllm._C_AVX2`, which lacks some ops of the
  AVX-512 one) and takes its non-AMX paths, as it does on an AVX2 CPU, because it asks
  `torch.cpu._is_avx512_supported()` and friends, answered False here;
* torch's own kernels (`ATEN_CPU_CAPABILITY`), oneDNN and MKL are capped at AVX2 by their own
  environment variables, and the native MoRA kernel takes its AVX2 path (`MORA_CPU_ISA`);
  variables already set are left as they are.

Compiled code is cached apart (`TORCHINDUCTOR_CACHE_DIR`, `VLLM_CACHE_ROOT`): torch's inductor cache
does not key its entries by the vector ISA, so an emulated run that reused kernels compiled for
AVX-512 by an ordinary run computed wrong results (measured: vLLM's vocabulary-shard masking at
tensor-parallel 2 read out of range). A real AVX2 machine never holds AVX-512 artifacts.

CPUID itself cannot be changed: code that reads it directly still sees the real CPU. Without
`MORA_EMULATE_CPU=avx2` this module does nothing.
"""

import os

if os.environ.get("MORA_EMULATE_CPU", "").strip().lower() == "avx2":
    for name, value in (("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"), ("DNNL_MAX_CPU_ISA", "AVX2"),
                        ("MKL_ENABLE_INSTRUCTIONS", "AVX2"), ("MORA_CPU_ISA", "avx2")):
        os.environ.setdefault(name, value)
    import getpass
    import tempfile

    _user = getpass.getuser()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_{_user}_avx2"))
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(os.path.expanduser("~"), ".cache", "vllm-emulated-avx2"))
    try:
        import torch.cpu
    except ImportError:  # a Python without torch (a tool's venv) on the same PYTHONPATH
        pass
    else:
        for probe in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_vnni_supported",
                      "_is_amx_tile_supported", "_is_amx_fp16_supported"):
            if hasattr(torch.cpu, probe):
                setattr(torch.cpu, probe, lambda: False)
        if hasattr(torch.cpu, "_init_amx"):
            torch.cpu._init_amx = lambda: False
