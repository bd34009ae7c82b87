"""Offline decode throughput with vLLM (CPU build): base, merged, unmerged, mixed, LoRA.

For the 100M Llama-shaped model with random weights (and with `--models both`, the demo model
first; its ~15 ms steps show mostly a LoRA engine's fixed per-step costs):

* base      - vLLM with LoRA disabled, eager like every LoRA engine on the CPU (vLLM turns
              torch.compile off whenever LoRA is enabled there); its engine runs beside the
              LoRA engine, in the same rounds. `base_compiled`: the same with vLLM's default
              compilation, beside the compiled LoRA engine.
* merged    - one MoRA adapter merged into the base weights (every request uses it)
* unmerged  - the same adapter unmerged (type 6, the costlier kind)
* mixed16   - requests spread round-robin over 16 unmerged MoRA adapters (types 1 and 6)
* lora      - a plain LoRA r=8 adapter on the same modules (same trainable parameters as MoRA r=8)
* base_lora - base requests through the LoRA engine: MoRA-only steps launch no stock LoRA
              kernel (`mora_only_vs_base_lora`)
* merged_compiled / mixed16_compiled - the LoRA engine compiled (the plugin keeps vLLM's CPU
              compilation with LoRA), against `base_compiled`

Each scenario generates `--tokens` tokens for `--seqs` sequences (ignore_eos), once per round,
`--rounds` rounds (the merged block `--merged-rounds`); throughput is tokens/s. A summary ratio
is the median over rounds of each round's ratio: the base runs in the same round as the scenario it divides, so a machine whose
speed drifts during the run (shared cores) moves both sides. The merged scenario's rounds run
in a block of their own, the adapter merged once before them, each paired with a base run in
alternating order (`base_beside_merged`); the other scenarios' rounds follow, unmerged. Both
blocks start settled: on the VMs this was measured on, whatever runs in the seconds after a
merge or an unmerge is 10-30% slower (the base engine beside the merged one too), a one-off cost
of the merge (timed on its own: merge and unmerge latency of a whole adapter, through the
worker extension), not of merged traffic.

    python -m bench.serving     # < 10 minutes on 2 cores; ends with one line:
    merged_vs_base=.. mixed16_vs_base=.. mora_vs_lora=.. mora_only_vs_base_lora=..
    merged_vs_base_compiled=.. mixed16_vs_base_compiled=.. isa=.. seconds=..
    (mora_vs_lora = MoRA unmerged time / LoRA time; isa: the native kernel's path; `emulated=avx2`
    follows when `--isa avx2` runs everything as a CPU without AVX-512 does)
    python -m bench.serving --isa avx2   # as on a CPU without AVX-512: the native kernel's AVX2
                                         # path, torch's and vLLM's kernels held to AVX2 (bench.isa)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.isa import add_isa_argument, emulated, isa_held, run_on

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def _larger_model(path: Path) -> Path:
    import torch
    import transformers

    from mora.demo import build_tokenizer

    if (path / "config.json").is_file():
        return path
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=512, bos_token_id=256, eos_token_id=257, pad_token_id=258,
        tie_word_embeddings=False, initializer_range=0.02,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path)
    return path


def _make_adapters(model: Path, root: Path) -> tuple[list[Path], Path]:
    import torch

    from mora.checkpoint import AdapterConfig, LoraAdapter, MoraAdapter, save_lora_adapter, save_mora_adapter
    from mora.hf import module_shapes_from_config
    from mora.spec import MoraSpec

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    shapes = {m: s for m, s in module_shapes_from_config(model).items() if m.rsplit(".", 1)[-1] in targets}
    moras = []
    for i in range(16):
        path = root / f"mora-{i:02d}"
        t = 6 if i % 2 == 0 else 1
        if not (path / "adapter_config.json").is_file():
            g = torch.Generator().manual_seed(i)
            cfg = AdapterConfig(r=8, target_modules=targets, use_mora=True, mora_type=t, lora_alpha=16)
            weights = {}
            for m, (o, k) in shapes.items():
                spec = MoraSpec.from_rank(k, o, 8, t)
                weights[m] = torch.randn(spec.n, spec.n, generator=g) * 0.02
            save_mora_adapter(MoraAdapter(path.name, cfg, weights), path)
        moras.append(path)
    lora = root / "lora-r8"
    if not (lora / "adapter_config.json").is_file():
        g = torch.Generator().manual_seed(99)
        cfg = AdapterConfig(r=8, target_modules=targets, lora_alpha=16)
        a = {m: torch.randn(8, k, generator=g) * 0.02 for m, (o, k) in shapes.items()}
        b = {m: torch.randn(o, 8, generator=g) * 0.02 for m, (o, k) in shapes.items()}
        save_lora_adapter(LoraAdapter(lora.name, cfg, a, b), lora)
    return moras, lora


def _engine(model: Path, lora: bool, eager: bool = True):
    from vllm import LLM

    kwargs = dict(dtype="float32", max_model_len=512, kv_cache_memory_bytes=512 * 2**20, max_num_seqs=64, seed=0,
                  enforce_eager=eager)
    if lora:
        kwargs |= dict(enable_lora=True, max_loras=16, max_lora_rank=8, max_cpu_loras=20,
                       worker_extension_cls="mora.vllm_plugin.extension.MoraWorkerExtension")
    return LLM(model=str(model), **kwargs)


def _close(llm) -> None:
    core = llm.llm_engine.engine_core
    if hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def _throughput(llm, prompts, params, loras) -> float:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def bench_model(name: str, model: Path, adapter_root: Path, args: argparse.Namespace) -> dict:
    """Each round runs every scenario once, the LoRA-disabled base in the same round: both
    engines of a phase live side by side, so a round's ratios are taken minutes apart at most
    and a machine whose speed drifts moves both sides of them (`ratios`: medians of the
    per-round ratios; `throughput`: medians of each scenario). The merged rounds come first,
    with the adapter merged once, each beside its own base run (module docstring)."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    moras, lora_path = _make_adapters(model, adapter_root)
    prompts = [f"request {i}: the secret code of item {i} is " for i in range(args.seqs)]
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    reqs = [LoRARequest(p.name, i + 1, str(p)) for i, p in enumerate(moras)]
    lora_req = LoRARequest("lora-r8", 100, str(lora_path))
    merged = [reqs[0]] * len(prompts)
    scenarios = {
        "base_lora": [None] * len(prompts),  # base requests through the LoRA engine (mora_only_vs_base_lora)
        "mixed16": [reqs[i % 16] for i in range(len(prompts))],
        "unmerged": merged,
        "lora": [lora_req] * len(prompts),
    }
    results: dict[str, list[float]] = {k: [] for k in ["base", "merged", "base_beside_merged", *scenarios]}

    base = _engine(model, lora=False)
    llm = _engine(model, lora=True)
    for r in [*reqs, lora_req]:
        llm.llm_engine.add_lora(r)
    _throughput(base, prompts[:4], params, None)  # warm-up
    for loras in scenarios.values():
        _throughput(llm, prompts[:4], params, loras[:4])  # warm-up: activate adapters
    merge_s, unmerge_s, status = _merge_latency(llm, reqs[0].lora_int_id)
    results["merged"], results["base_beside_merged"] = _merged_rounds(
        llm, reqs[0].lora_int_id, args.merged_rounds, lambda: _throughput(llm, prompts, params, merged),
        lambda: _throughput(base, prompts, params, None))
    _settle(lambda: _throughput(llm, prompts, params, None))
    for _ in range(args.rounds):
        results["base"].append(_throughput(base, prompts, params, None))
        for key, loras in scenarios.items():
            results[key].append(_throughput(llm, prompts, params, loras))
    _close(llm)
    _close(base)
    results |= _compiled(model, reqs, prompts, params, args)
    return {
        "model": name,
        "throughput": {k: statistics.median(v) for k, v in results.items()},
        "ratios": _ratios(results),
        "rounds": results,
        "merge_s": merge_s,
        "unmerge_s": unmerge_s,
        "merge_status": {k: status[k] for k in ("layers", "backup_bytes", "merged_copy_bytes", "changed_elements", "packed")},
    }


def _compiled(model: Path, reqs: list, prompts: list[str], params, args: argparse.Namespace) -> dict[str, list[float]]:
    """Merged and mixed traffic on the LoRA engine compiled (the plugin keeps vLLM's CPU
    compilation with LoRA; its stock and MoRA updates run inside ops), against the compiled base
    in the same rounds, merged rounds first as in `bench_model`."""
    base = _engine(model, lora=False, eager=False)
    llm = _engine(model, lora=True, eager=False)
    for r in reqs:
        llm.llm_engine.add_lora(r)
    mixed = [reqs[i % 16] for i in range(len(prompts))]
    merged = [reqs[0]] * len(prompts)
    _throughput(base, prompts[:4], params, None)  # warm-up (and compilation)
    _throughput(llm, prompts[:4], params, mixed[:4])
    out: dict[str, list[float]] = {k: [] for k in ("base_compiled", "merged_compiled", "base_compiled_beside_merged",
                                                   "mixed16_compiled")}
    out["merged_compiled"], out["base_compiled_beside_merged"] = _merged_rounds(
        llm, reqs[0].lora_int_id, args.merged_rounds, lambda: _throughput(llm, prompts, params, merged),
        lambda: _throughput(base, prompts, params, None))
    _settle(lambda: _throughput(llm, prompts, params, mixed))
    for _ in range(args.rounds):
        out["base_compiled"].append(_throughput(base, prompts, params, None))
        out["mixed16_compiled"].append(_throughput(llm, prompts, params, mixed))
    _close(llm)
    _close(base)
    return out


# Runs after a merge or an unmerge before measuring: on this project's VMs whatever runs in the
# seconds after one is 10-30% slower, the base engine beside the merged one too (the merge
# allocates and frees ~2x the model's packed weights, which the VM's free page reporting hands
# back to the host), a one-off cost of the merge that steady merged traffic does not pay.
SETTLE_RUNS = 2


def _settle(run: Callable[[], object]) -> None:
    for _ in range(SETTLE_RUNS):
        run()


def _merged_rounds(llm, lora_int_id: int, rounds: int, run_merged: Callable[[], float],
                   run_base: Callable[[], float]) -> tuple[list[float], list[float]]:
    """The merged block: the adapter merged once, settled (`_settle`), then `rounds` rounds of
    one merged and one base run in alternating order; unmerged after. Returns both sides' tok/s."""
    merged: list[float] = []
    base: list[float] = []
    llm.collective_rpc("mora_merge", args=(lora_int_id,))
    try:
        _settle(run_merged)
        for r in range(rounds):
            for run in _paired_order(r, lambda: merged.append(run_merged()), lambda: base.append(run_base())):
                run()
    finally:
        llm.collective_rpc("mora_unmerge")
    return merged, base


def _merge_latency(llm, lora_int_id: int, times: int = 2) -> tuple[float, float, dict]:
    """Median merge and unmerge latency of a whole adapter through the worker extension, and the
    last merge's status."""
    merge_s, unmerge_s, status = [], [], {}
    for _ in range(times):
        t = time.perf_counter()
        status = llm.collective_rpc("mora_merge", args=(lora_int_id,))[0]
        merge_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        llm.collective_rpc("mora_unmerge")
        unmerge_s.append(time.perf_counter() - t)
    return statistics.median(merge_s), statistics.median(unmerge_s), status


def _paired_order(round_index: int, first: Callable[[], None], second: Callable[[], None]) -> tuple[Callable[[], None], ...]:
    """The merged scenario and the base it is compared with, in alternating order (ABBA): a
    side that always ran second would always inherit what the first left behind (garbage to
    collect, a cooled or throttled core), a bias no number of rounds removes."""
    return (first, second) if round_index % 2 == 0 else (second, first)


# summary key -> (numerator, denominator); mora_vs_lora is a time ratio (LoRA tokens/s over MoRA's)
RATIOS = {
    "merged_vs_base": ("merged", "base_beside_merged"),
    "mixed16_vs_base": ("mixed16", "base"),
    "mora_vs_lora": ("lora", "unmerged"),
    "mora_only_vs_base_lora": ("unmerged", "base_lora"),
    "merged_vs_base_compiled": ("merged_compiled", "base_compiled_beside_merged"),
    "mixed16_vs_base_compiled": ("mixed16_compiled", "base_compiled"),
}


def _ratios(results: dict[str, list[float]]) -> dict[str, float]:
    """Each summary ratio as the median over rounds of that round's ratio."""
    return {key: statistics.median(a / b for a, b in zip(results[num], results[den], strict=True))
            for key, (num, den) in RATIOS.items()}


def _write_docs(reports: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    DOCS.mkdir(exist_ok=True)
    order = ["base_compiled", "base", "base_lora", "merged", "unmerged", "mixed16", "lora", "merged_compiled",
             "mixed16_compiled"]
    fig, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 3.8))
    axes = axes if len(reports) > 1 else [axes]
    for ax, rep in zip(axes, reports, strict=True):
        vals = [rep["throughput"][k] / rep["throughput"]["base"] for k in order]
        ax.bar(order, vals, color=["#bbb", "#777", "#2a9d8f", "#e9c46a", "#f4a261", "#e76f51", "#457b9d"])
        ax.tick_params(axis="x", labelrotation=30)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(rep["model"])
        ax.set_ylabel("decode throughput / base")
        ax.set_ylim(0, max(1.2, max(vals) * 1.1))
        for i, v in enumerate(vals):
            ax.text(i, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "serving_throughput.png", dpi=110)
    lines = ["| model | " + " | ".join(order) + " | merge s | unmerge s |", "|---" * (len(order) + 3) + "|"]
    for rep in reports:
        t = rep["throughput"]
        cells = [f"{t[k]:.0f} tok/s ({t[k] / t['base']:.2f}x)" for k in order]
        lines.append(f"| {rep['model']} | " + " | ".join(cells) + f" | {rep['merge_s']:.3f} | {rep['unmerge_s']:.3f} |")
    table = "\n".join(lines)
    (DOCS / "serving_results.md").write_text(
        f"<!-- written by `python -m bench.serving` ({args.seqs} sequences x {args.tokens} tokens, {args.rounds} rounds, {args.merged_rounds} merged) -->\n"
        f"{table}\n\n![decode throughput relative to base](serving_throughput.png)\n\n"
        f"```json\n{json.dumps(reports, indent=1)}\n```\n"
    )
    print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--merged-rounds", type=int, default=10,
                        help="rounds of the merged block (two runs each, the other block five): a merged adapter "
                             "runs at the base's speed, so its ratio's margin is the smallest")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/serving_*")
    parser.add_argument("--models", choices=("100m", "both"), default="100m",
                        help="the 100M model only (the summary's), or the demo model first as well")
    add_isa_argument(parser)
    args = parser.parse_args(argv)
    if args.isa:
        run_on(args.isa, "bench.serving", sys.argv[1:] if argv is None else argv)
    if isa_held():
        print(isa_held(), flush=True)
    started = time.monotonic()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from mora.demo import build_demo_assets

    args.cache.mkdir(parents=True, exist_ok=True)
    demo = args.cache / "demo"
    if not (demo / "demo.json").is_file():
        build_demo_assets(demo, log=lambda _: None)
    models = {"llama-shaped (100M)": _larger_model(args.cache / "llama-100m")}
    if args.models == "both":
        models = {"demo (3M)": demo / "base", **models}
    reports = []
    for name, path in models.items():
        rep = bench_model(name, path, args.cache / f"adapters-{path.parent.name}-{path.name}", args)
        t = rep["throughput"]
        print(f"{name}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in t.items())
              + f"; merge {rep['merge_s']:.3f}s unmerge {rep['unmerge_s']:.3f}s {rep['merge_status']}", flush=True)
        reports.append(rep)
        for key, (num, den) in RATIOS.items():
            per_round = [a / b for a, b in zip(rep["rounds"][num], rep["rounds"][den], strict=True)]
            print(f"  {key} per round: " + " ".join(f"{r:.2f}" for r in per_round), flush=True)
    if not args.no_docs:
        _write_docs(reports, args)
    from mora.kernels.native import native_isa

    ratios = reports[-1]["ratios"]
    print(" ".join(f"{k}={v:.2f}" for k, v in ratios.items())
          + f" isa={native_isa() or 'blas'}{emulated()} seconds={time.monotonic() - started:.0f}")

if __name__ == "__main__":
    main()
