"""Server configuration: command-line flags, `MORA_SERVE_*` environment variables, a config file.

Precedence: flags > environment > config file (`--config`, YAML/JSON/TOML) > defaults. Every
value is validated here, at the edge, with errors that name the setting.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = ["ServerSettings", "load_settings", "parse_args"]

ENV_PREFIX = "MORA_SERVE_"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values


class _FileSource(PydanticBaseSettingsSource):
    """Values from the `--config` file (lowest precedence after defaults)."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.values = values

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


class ServerSettings(BaseSettings):
    """Everything `mora-serve` can be told."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    model: Path = Field(description="base model directory (Hugging Face layout)")
    adapter_root: Path = Field(description="directory adapters are loaded from (paths are confined to it)")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in a container)")
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9400, ge=0, le=65535, description="Prometheus /metrics port; 0 disables it")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and activations; vLLM's auto runs float32 checkpoints in 16 bits")
    max_loras: int = Field(4, ge=1, le=256, description="adapter slots on the device (distinct adapters per step)")
    max_cpu_loras: int = Field(16, ge=1, description="adapters kept loaded in the engine's host cache")
    max_lora_rank: int = Field(16, description="largest LoRA-equivalent rank r of any adapter")
    max_model_len: int | None = Field(None, ge=16, description="context length (None: the model's)")
    max_num_seqs: int = Field(64, ge=1, description="sequences the engine batches per step")
    kv_cache_bytes: int | None = Field(None, ge=1 << 20, description="KV cache size on CPU (None: vLLM's)")
    enforce_eager: bool = Field(False, description="no CUDA graphs / torch.compile (faster start, slower steps)")
    # vLLM's own distributed execution: TP within a node, PP across nodes (Ray for multi-node)
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per pipeline stage (tensor parallel)")
    pipeline_parallel_size: int = Field(1, ge=1, description="pipeline stages (nodes, with the ray backend)")
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = Field(
        None, description="vLLM's executor: mp (one node), ray (several nodes); default: vLLM's choice")
    preload: list[str] = Field(default_factory=list, description="ID=PATH adapters loaded at start-up")
    tenants: Path | None = None
    snapshot_dir: Path | None = Field(None, description="where validated adapter snapshots are written (default: a private temp dir)")
    sources: dict[str, str] = Field(default_factory=dict, description="registered adapter sources: name -> path under the root")
    # automatic merge policy (dLoRA-style)
    auto_merge: bool = True
    merge_window_s: float = Field(10.0, gt=0)
    merge_share: float = Field(0.9, gt=0, le=1)
    unmerge_share: float = Field(0.6, ge=0, lt=1)
    merge_min_requests: int = Field(8, ge=1)
    merge_min_dwell_s: float = Field(5.0, ge=0)
    policy_interval_s: float = Field(0.5, gt=0)
    # lifecycle and load shedding
    shutdown_grace_s: float = Field(30.0, ge=0)
    unload_timeout_s: float = Field(30.0, ge=0)
    max_pending_requests: int = Field(256, ge=1, description="requests admitted at once; more are shed")
    max_prompt_bytes: int = Field(1 << 20, ge=1)
    # metrics
    metrics_label_limit: int = Field(100, ge=1, description="distinct adapter/tenant label values before 'other'")
    # TLS
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = Field(None, description="require client certificates signed by this CA")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, v: int) -> int:
        if v not in LORA_RANKS:
            raise ValueError(f"must be one of {LORA_RANKS} (vLLM's max_lora_rank values)")
        return v

    @field_validator("preload")
    @classmethod
    def _preload(cls, v: list[str]) -> list[str]:
        for item in v:
            ident, sep, path = item.partition("=")
            if not sep or not ident or not path:
                raise ValueError(f"{item!r}: expected ID=PATH")
        return v

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        if self.unmerge_share >= self.merge_share:
            raise ValueError("unmerge_share must be below merge_share (hysteresis)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        return self

    @property
    def preload_map(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.preload)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):  # noqa: ANN001
        return init_settings, env_settings, _FileSource(settings_cls, _FILE_VALUES)


_FILE_VALUES: dict[str, Any] = {}


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mora-serve",
        description="gRPC server for MoRA (and LoRA) adapters on vLLM. Every flag can also be set as "
        f"{ENV_PREFIX}<NAME> (e.g. {ENV_PREFIX}PORT) or in --config.",
    )
    p.add_argument("--config", type=Path, help="YAML/JSON/TOML file with any of these settings")
    p.add_argument("--model")
    p.add_argument("--adapter-root")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--metrics-port", type=int)
    p.add_argument("--dtype")
    p.add_argument("--max-loras", type=int)
    p.add_argument("--max-cpu-loras", type=int)
    p.add_argument("--max-lora-rank", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--kv-cache-bytes", type=int)
    p.add_argument("--enforce-eager", action="store_true", default=None)
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--pipeline-parallel-size", type=int)
    p.add_argument("--distributed-executor-backend")
    p.add_argument("--preload", nargs="*", metavar="ID=PATH")
    p.add_argument("--tenants", help="tenants file (API key hashes, adapters, limits); none: open server")
    p.add_argument("--snapshot-dir", help="where validated adapter snapshots go (default: a private temp dir)")
    p.add_argument("--no-auto-merge", dest="auto_merge", action="store_false", default=None)
    p.add_argument("--shutdown-grace-s", type=float)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-client-ca")
    p.add_argument("--log-level")
    for action in p._actions:  # help text and defaults come from the settings model: one source of truth
        field = ServerSettings.model_fields.get(action.dest)
        if field is not None and action.help is None:
            default = "" if field.is_required() else f" (default: {field.get_default(call_default_factory=True)})"
            action.help = f"{field.description or ''}{default}".strip() or None
    return p


def parse_args(argv: list[str] | None = None) -> tuple[dict[str, Any], Path | None]:
    ns = build_parser().parse_args(argv)
    values = {k: v for k, v in vars(ns).items() if v is not None and k != "config"}
    return values, ns.config


def load_settings(cli: dict[str, Any], config_file: Path | None = None) -> ServerSettings:
    """Settings from flags (`cli`), the environment and `config_file`, in that precedence."""
    _FILE_VALUES.clear()
    if config_file is not None:
        _FILE_VALUES.update(_read_config_file(config_file))
    try:
        return ServerSettings(**cli)
    finally:
        _FILE_VALUES.clear()
