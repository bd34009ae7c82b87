"""`mora`: inspect MoRA adapters, merge one into a standalone model, build the demo assets."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Column, Table

from mora.errors import MoraError

console = Console()
err_console = Console(stderr=True)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
)


def _inspect(args: argparse.Namespace) -> int:
    from mora.checkpoint import load_adapter
    from mora.hf import module_shapes_from_config
    from mora.kinds import kind_of

    adapter = load_adapter(args.adapter)
    kind = kind_of(adapter)
    base = args.base
    if base is None and adapter.config.base_model_name_or_path and Path(adapter.config.base_model_name_or_path).is_dir():
        base = Path(adapter.config.base_model_name_or_path)
    bound = kind.bind(adapter, module_shapes_from_config(base)) if base is not None else None
    console.print(f"[bold]{adapter.name}[/bold]: {kind.label(adapter)}, r={adapter.config.r}, {adapter.num_parameters:,} parameters")
    console.print(f"base model: {adapter.config.base_model_name_or_path or 'not recorded'}" + (f" (validated against {base})" if bound else ""))
    table = Table(Column("module", overflow="fold"), "shape", "r", kind.size_column, "params", "MFLOP/token", "LoRA r MFLOP/token")
    total_flops = total_lora = 0
    for module, t in kind.modules(adapter).items():
        shape = r = flops = lora_flops = "?"
        if bound is not None:
            shape, r, f, lf = kind.cost(adapter, bound, module)
            total_flops += f
            total_lora += lf
            flops, lora_flops = f"{f / 1e6:.3f}", f"{lf / 1e6:.3f}"
        table.add_row(module, shape, str(r), str(t.shape[0]), f"{kind.parameters(adapter, module):,}", flops, lora_flops)
    console.print(table)
    if bound is not None:
        console.print(
            f"unmerged cost: {total_flops / 1e6:.2f} MFLOP/token vs {total_lora / 1e6:.2f} for LoRA at the same r "
            f"({total_flops / max(total_lora, 1):.2f}x); merged: zero"
        )
    return 0


def _merge(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from mora.checkpoint import load_mora_adapter
    from mora.hf import linear_module_shapes
    from mora.merge import merge_
    from mora.validate import bind_mora

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise SystemExit(f"error: {out} exists and is not empty (use --force to overwrite)")
    adapter = load_mora_adapter(args.adapter)
    model = AutoModelForCausalLM.from_pretrained(str(args.base), dtype="auto")
    bound = bind_mora(adapter, linear_module_shapes(model))
    start = time.perf_counter()
    with torch.no_grad():
        for module, spec in tqdm(bound.specs.items(), desc=f"merging {adapter.name}", unit="module"):
            weight = model.get_submodule(module).weight
            merge_(weight, adapter.weights[module], spec, exact=False, safe=True)
    elapsed = time.perf_counter() - start
    model.save_pretrained(str(out), safe_serialization=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(args.base) / name).is_file():
            shutil.copy2(Path(args.base) / name, out / name)
            copied.append(name)
    console.print(
        f"merged {len(bound.specs)} modules of {adapter.name!r} in {elapsed:.2f}s -> {out} "
        f"(tokenizer files copied: {', '.join(copied) or 'none found'})"
    )
    return 0


def _demo_assets(args: argparse.Namespace) -> int:
    from mora.demo import build_demo_assets

    start = time.perf_counter()
    out = build_demo_assets(args.out, seed=args.seed, log=console.print)
    console.print(f"demo assets in {out} ({time.perf_counter() - start:.0f}s)")
    return 0


def _show_demo(args: argparse.Namespace) -> int:
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mora.checkpoint import load_mora_adapter
    from mora.hf import MoraModel
    from mora.train import greedy_complete

    root = Path(args.assets)
    demo = json.loads((root / "demo.json").read_text())["adapters"]
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    tokenizer = AutoTokenizer.from_pretrained(str(root / "base"))
    mm = MoraModel(model)
    for name in demo:
        mm.add_adapter(load_mora_adapter(root / "adapters" / name))
    table = Table("adapter", "prompt", "base model says", "adapter says", "memorized", title="MoRA demo (transformers, CPU)")
    failures = 0
    for name, facts in demo.items():
        kind = f"{name} (type {int(mm.adapters[name].adapter.mora_type)})"
        for fact in facts:
            mm.set_adapter(None)
            base = greedy_complete(model, tokenizer, fact["prompt"], max_new_tokens=40)
            mm.set_adapter(name)
            got = greedy_complete(model, tokenizer, fact["prompt"], max_new_tokens=40)
            ok = got == fact["completion"]
            failures += not ok
            table.add_row(kind, fact["prompt"], repr(base[:24]), got, "[green]yes[/green]" if ok else "[red]NO[/red]")
    console.print(table)
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="type, n and parameters per module; unmerged cost vs LoRA")
    p.add_argument("adapter", type=Path, help="adapter directory (peft-mora layout)")
    p.add_argument("--base", type=Path, default=None, help="base model directory to validate against")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("merge", help="write a standalone model with the adapter folded into its weights")
    p.add_argument("--base", type=Path, required=True, help="base model directory (Hugging Face layout)")
    p.add_argument("--adapter", type=Path, required=True, help="MoRA adapter directory")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.set_defaults(func=_merge)
    p = sub.add_parser("demo-assets", help="build the embedded demo: tiny Llama, tokenizer, trained adapters")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo_assets)
    p = sub.add_parser("show-demo", help="each demo adapter answering its prompts, next to the base model")
    p.add_argument("assets", type=Path, help="directory built by `mora demo-assets`")
    p.set_defaults(func=_show_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MoraError as e:
        err_console.print(f"[red]error:[/red] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
