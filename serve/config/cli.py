"""Where settings come from: command-line flags generated from `ServerSettings` (one per field,
with its help, default and environment variable, as vLLM's `EngineArgs.add_cli_args`), the
`MORA_SERVE_*` environment, and a `--config` file (YAML, JSON or TOML).

Precedence: flags > environment > config file > defaults.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from serve.config.settings import ENV_PREFIX, ServerSettings
from serve.config.settings import setting_kind as _kind

__all__ = ["build_parser", "load_settings", "parse_args"]


class _FileSource(PydanticBaseSettingsSource):
    """Values from the `--config` file (lowest precedence after defaults)."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.values = values

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def _read_config_file(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(text) or {}
    elif path.suffix == ".toml":
        data = tomllib.loads(text)
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file {path}: use .yaml, .toml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping at the top level")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _flag(name: str, field: FieldInfo) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return str(extra.get("flag") or "--" + name.replace("_", "-"))


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    d = field.get_default(call_default_factory=True)
    if isinstance(d, bool):
        return f"default: {str(d).lower()}"
    if d is None or d == [] or d == {}:
        return "default: none"
    return f"default: {d}"


def build_parser() -> argparse.ArgumentParser:
    """Flags generated from `ServerSettings`: one per field, with its help, default and env var.

    Booleans are `--x/--no-x`; list settings accumulate over repeated flags and take several
    values per flag; dict settings take repeated KEY=VALUE. A field may name its flag with
    `json_schema_extra={"flag": "--engine-arg"}`.
    """
    p = argparse.ArgumentParser(
        prog="mora-serve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="gRPC server for MoRA (and LoRA) adapters on vLLM.\n\n"
        f"Every setting is a flag, an environment variable {ENV_PREFIX}<NAME> (e.g. {ENV_PREFIX}MAX_LORAS) and a\n"
        "key of the --config file (max_loras or max-loras). Precedence: flags > environment > file > defaults.\n"
        "List and dict settings in the environment: JSON ('[\"a=/x\"]', '{\"k\": \"v\"}') or comma-separated items.",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML/JSON/TOML file with any of these settings")
    for name, field in ServerSettings.model_fields.items():
        kind, env = _kind(field), ENV_PREFIX + name.upper()
        help_text = f"{field.description or name.replace('_', ' ')} ({_default_text(field)}; env {env})"
        flag = _flag(name, field)
        if kind == "bool":
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind == "list":
            p.add_argument(flag, dest=name, action="extend", nargs="+", default=None,
                           metavar=_metavar(name, field, "VALUE"), help=help_text + "; repeatable")
        elif kind == "dict":
            p.add_argument(flag, dest=name, action="extend", nargs="+", default=None,
                           metavar=_metavar(name, field, "KEY=VALUE"), help=help_text + "; repeatable")
        else:
            p.add_argument(flag, dest=name, default=None, metavar=_metavar(name, field, name.upper()), help=help_text)
    return p


def _metavar(name: str, field: FieldInfo, fallback: str) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if extra.get("metavar"):
        return str(extra["metavar"])
    ann = field.annotation
    members = get_args(ann) if get_origin(ann) in (Union, UnionType) else (ann,)
    if not any(get_origin(a) is Literal for a in members):
        return fallback
    # `int | Literal["auto"]` reads {N,auto}: a number or one of the words
    words = ["N" if a is int else "X" if a is float else None for a in members if get_origin(a) is not Literal]
    words += [str(v) for a in members if get_origin(a) is Literal for v in get_args(a)]
    return "{" + ",".join(w for w in words if w) + "}"


def parse_args(argv: list[str] | None = None) -> tuple[dict[str, Any], Path | None]:
    """The flags given (values as typed; `ServerSettings` validates them) and the --config path."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    values = {k: v for k, v in vars(ns).items() if v is not None and k != "config"}
    return values, ns.config


def load_settings(cli: dict[str, Any], config_file: Path | None = None) -> ServerSettings:
    """Settings from flags (`cli`), the environment and `config_file`, in that precedence."""
    if config_file is None:
        return ServerSettings(**cli)
    values = _read_config_file(config_file)

    class WithFile(ServerSettings):
        # The file's values below flags and environment, for this one load (no shared state).
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,  # noqa: ANN001
                                       file_secret_settings):  # noqa: ANN001
            return init_settings, env_settings, _FileSource(settings_cls, values)

    return WithFile(**cli)
