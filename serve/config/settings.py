"""The server's settings (`ServerSettings`): one pydantic model, every value validated at the
edge with errors that name the setting. Where values come from (flags, `MORA_SERVE_*`
environment variables, a config file) is `serve/config/cli.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ENV_PREFIX", "LORA_RANKS", "ServerSettings", "setting_kind"]

ENV_PREFIX = "MORA_SERVE_"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values
MAX_SLOTS = 1024  # adapter slots per step at most (the step metadata and slot bookkeeping are O(slots))


class ServerSettings(BaseSettings):
    """Everything `mora-serve` can be told."""

    # enable_decoding=False: list and dict settings in the environment reach `_items` as text, so
    # that comma-separated values work beside JSON and a malformed one is an error naming the setting.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True, enable_decoding=False)

    model: Path = Field(description="base model directory (Hugging Face layout)")
    adapter_root: Path = Field(description="directory adapters are loaded from (paths are confined to it)")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in a container)")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port)")
    http_port: int = Field(8000, ge=0, le=65535, description="OpenAI-compatible HTTP API port; 0 disables it")
    metrics_port: int = Field(9400, ge=0, le=65535, description="Prometheus /metrics port; 0 disables it")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and activations; vLLM's auto runs float32 checkpoints in 16 bits")
    max_loras: int | Literal["auto"] = Field(4, description="adapter slots on the device (distinct adapters per step), "
                                             "1-1024; auto: as many as adapter_slots_bytes holds")
    adapter_slots_bytes: int = Field(1 << 30, ge=1 << 20, description="with max_loras auto: the device memory a step's "
                                     "adapter slots may take (vLLM's LoRA buffers and the MoRA slot tables)")
    max_cpu_loras: int = Field(16, ge=1, description="adapters kept loaded in the engine's host cache")
    max_lora_rank: int = Field(16, description="largest LoRA-equivalent rank r of any adapter")
    max_model_len: int | None = Field(None, ge=16, description="context length; none: the model's")
    max_num_seqs: int = Field(64, ge=1, description="sequences the engine batches per step")
    kv_cache_bytes: int | None = Field(None, ge=1 << 20, description="KV cache size in bytes on CPU; none: vLLM's")
    enforce_eager: bool = Field(False, description="no CUDA graphs / torch.compile (faster start, slower steps)")
    # vLLM's own distributed execution: TP within a node, PP across nodes (Ray for multi-node)
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per pipeline stage (tensor parallel)")
    pipeline_parallel_size: int = Field(1, ge=1, description="pipeline stages (nodes, with the ray backend)")
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = Field(
        None, description="vLLM's executor: mp (one node), ray (several nodes); none: vLLM's choice")
    engine: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"flag": "--engine-arg", "metavar": "KEY=VALUE"},
        description="any other vLLM EngineArgs setting (repeatable: enable_prefix_caching=true, max_num_batched_tokens=2048...), "
        "checked against vLLM's EngineArgs before the engine starts")
    # structured outputs (response_format, structured_outputs, SamplingParams.structured)
    structured_output_backend: Literal["auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer"] = Field(
        "auto", description="vLLM's structured-output backend; auto: xgrammar, falling back to the others for what it cannot compile")
    structured_output_compact_json: bool = Field(
        False, description="JSON outputs without whitespace between tokens (backend xgrammar or guidance): compact, and a "
        "model cannot spend its tokens on whitespace the grammar would allow")
    # adapter tiers: snapshots on disk -> vLLM's host cache (max_cpu_loras) -> device slots (max_loras)
    max_adapters: int = Field(10000, ge=1, description="adapters registered at once (each is a snapshot on disk; "
                              "host memory holds only max_cpu_loras of them)")
    adapter_disk_bytes: int | None = Field(None, ge=1, description="disk budget of the validated adapter "
                                           "snapshots in bytes; none: bounded by max_adapters only")
    adapter_load_timeout_s: float = Field(60.0, gt=0, description="seconds a request waits for its adapter to be "
                                          "read from disk or, registered lazily, validated")
    management_calls_per_tenant: int = Field(2, ge=1, description="adapter loads, unloads, merges and unmerges a "
                                             "(non-admin) tenant may have in flight; more are refused RESOURCE_EXHAUSTED")
    admission_max_passes: int = Field(16, ge=0, description="engine steps that may admit later requests past a "
                                      "waiting one whose adapter has no slot, before the requests behind it wait for "
                                      "it; 0: strict arrival order (no request is passed over; steps run fewer requests)")
    # 8: one tenant's spread traffic over 1,000 adapters ran at 0.65 of its 16-adapter throughput
    # with 2 turns, 0.79 with 8 (bench.scale --quick); another tenant's read waits for at most
    # this many reads of each flooding tenant, most of them from the page cache (one round trip).
    page_ins_per_tenant: int = Field(8, ge=1, description="adapters of one tenant read from disk at once; its "
                                     "other cold adapters wait their turn, so no tenant's flood delays another's")
    pin_preloaded: bool = Field(True, description="keep preloaded adapters in the host cache for good "
                                "(at most max_cpu_loras - max_loras of them)")
    preload: list[str] = Field(default_factory=list, description="adapters loaded (and validated) before serving",
                               json_schema_extra={"metavar": "ID=PATH"})
    tenants: Path | None = Field(None, description="tenants file (API key hashes, adapters, limits); none: an open server")
    snapshot_dir: Path | None = Field(None, description="where validated adapter snapshots are written; none: a private temp dir")
    sources: dict[str, str] = Field(default_factory=dict, description="registered adapter sources: name -> path under "
                                    "the root or a source URI (s3://, hf://)", json_schema_extra={"metavar": "NAME=PATH"})
    # adapters from object storage and the hub (serve/adapters/sources): endpoints and limits, never credentials
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, R2, GCS interoperability); "
                                        "none: AWS_ENDPOINT_URL or AWS's own. Credentials: the standard AWS variables or profile")
    s3_region: str | None = Field(None, description="S3 region; none: AWS_DEFAULT_REGION or the profile's")
    s3_profile: str | None = Field(None, description="AWS profile (shared config files) for S3; none: AWS_PROFILE or the default")
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="S3 bucket addressing: path for most S3-compatible servers (MinIO, rclone)")
    source_max_bytes: int = Field(4 << 30, ge=1, description="largest adapter downloaded from a source, all its files "
                                  "together (checked from the listing before any byte is fetched)")
    source_file_timeout_s: float = Field(300.0, gt=0, description="seconds one file's download may take (one attempt)")
    source_retries: int = Field(3, ge=0, le=10, description="retries of a failed listing or download (cut connections, "
                                "timeouts, 5xx), with exponential backoff")
    source_backoff_s: float = Field(0.5, ge=0, le=30, description="first wait before a retry (doubled each time)")
    source_downloads: int = Field(4, ge=1, le=64, description="adapter downloads running at once (server-wide)")
    # automatic merge policy (dLoRA-style)
    auto_merge: bool = Field(True, description="merge an adapter that dominates the traffic into the base weights")
    merge_window_s: float = Field(10.0, gt=0, description="seconds of traffic the merge policy looks at")
    merge_share: float = Field(1.0, gt=0, le=1, description="share of the window's requests that merges an adapter "
                               "(a merged adapter runs alone: any other request unmerges it, so below 1 it may flap)")
    unmerge_share: float = Field(0.6, ge=0, lt=1, description="share below which a merged adapter is unmerged")
    merge_min_requests: int = Field(8, ge=1, description="requests in the window before the policy acts")
    merge_min_dwell_s: float = Field(5.0, ge=0, description="seconds between two merge/unmerge transitions")
    merge_memory_bytes: int | None = Field(None, ge=1, description="memory a merge may use beside the serving weights "
                                           "(merged weights are prepared beside the steps); more: refused with the reason; none: no limit")
    policy_interval_s: float = Field(0.5, gt=0, description="seconds between two merge policy decisions")
    merge_wait_s: float = Field(5.0, ge=0, description="seconds a merge waits for other adapters' requests in flight "
                                "to finish before it gives up (a merged adapter serves only its own requests)")
    # lifecycle and load shedding
    shutdown_grace_s: float = Field(30.0, ge=0, description="seconds calls in flight get to finish after SIGTERM")
    unload_timeout_s: float = Field(30.0, ge=0, description="seconds an unload waits for the adapter's requests")
    max_pending_requests: int = Field(256, ge=1, description="requests admitted at once; more are shed")
    max_prompt_bytes: int = Field(1 << 20, ge=1, description="largest prompt accepted, in UTF-8 bytes")
    http_max_body_bytes: int = Field(16 << 20, ge=1024, description="largest HTTP request body (as gRPC's message "
                                     "limit); a larger one is refused with 413 as soon as the limit is crossed")
    max_update_ratio: float = Field(1024.0, gt=0, description="largest ||update||/||base weight|| of an adapter's module (docs/security.md)")
    # metrics
    metrics_label_limit: int = Field(100, ge=1, description="distinct adapter label values per tenant (and tenant "
                                     "values) before 'other'")
    metrics_bearer_token_file: Path | None = Field(None, description="require 'Authorization: Bearer <token>' on "
                                                   "/metrics, the token read from this file; none: open (docs/security.md)")
    metrics_tls_cert: Path | None = Field(None, description="serve /metrics over TLS with this certificate (PEM)")
    metrics_tls_key: Path | None = Field(None, description="private key (PEM) of metrics_tls_cert")
    # TLS
    tls_cert: Path | None = Field(None, description="server certificate (PEM); none: plaintext")
    tls_key: Path | None = Field(None, description="server private key (PEM), with tls_cert")
    tls_client_ca: Path | None = Field(None, description="require client certificates signed by this CA")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="logging threshold")

    @field_validator("max_loras")
    @classmethod
    def _slots(cls, v: int | str) -> int | str:
        if v != "auto" and not 1 <= int(v) <= MAX_SLOTS:
            raise ValueError(f"must be auto or between 1 and {MAX_SLOTS}")
        return v

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, v: int) -> int:
        if v not in LORA_RANKS:
            raise ValueError(f"must be one of {LORA_RANKS} (vLLM's max_lora_rank values)")
        return v

    @field_validator("*", mode="before")
    @classmethod
    def _items(cls, v: Any, info: ValidationInfo) -> Any:
        """List and dict settings from text: a JSON value, comma-separated items or KEY=VALUE items."""
        field = cls.model_fields[info.field_name]
        kind = setting_kind(field)
        if kind == "list" and isinstance(v, str):
            return _json_or_items(v, list)
        if kind == "dict":
            if isinstance(v, str):
                v = _json_or_items(v, dict)
            if isinstance(v, (list, tuple)):
                return _pairs(v, _value_type(field))
        return v

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: dict[str, Any]) -> dict[str, Any]:
        from serve.engine.args import (
            validate_engine_args,  # imports vLLM: only when there is something to check
        )

        return validate_engine_args(v) if v else v

    @field_validator("preload")
    @classmethod
    def _preload(cls, v: list[str]) -> list[str]:
        seen: set[str] = set()
        for item in v:
            ident, sep, path = item.partition("=")
            if not sep or not ident or not path:
                raise ValueError(f"{item!r}: expected ID=PATH")
            if ident in seen:
                raise ValueError(f"adapter id {ident!r} is preloaded twice")
            seen.add(ident)
        return v

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if self.max_loras != "auto" and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        if self.unmerge_share >= self.merge_share:
            raise ValueError("unmerge_share must be below merge_share (hysteresis)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        if (self.metrics_tls_cert is None) != (self.metrics_tls_key is None):
            raise ValueError("metrics_tls_cert and metrics_tls_key go together")
        if self.structured_output_compact_json and self.structured_output_backend not in ("xgrammar", "guidance"):
            raise ValueError("structured_output_compact_json needs structured_output_backend xgrammar or guidance")
        return self

    @property
    def model_name(self) -> str:
        """The base model's served name (vLLM's metrics label `model_name`, the OpenAI API's `model`):
        `--engine-arg served_model_name=NAME`, else the model directory's name, never its path."""
        served = self.engine.get("served_model_name")
        if isinstance(served, list | tuple):
            served = served[0] if served else None
        return str(served) if served else (self.model.resolve().name or "model")

    @property
    def preload_map(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.preload)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):  # noqa: ANN001
        # Flags (init values) over the environment; `serve.config.cli.load_settings` adds the
        # --config file below both.
        return init_settings, env_settings


def _json_or_items(text: str, kind: type) -> Any:
    """`text` as JSON when it looks like a JSON list/object, else its comma-separated items."""
    text = text.strip()
    if text[:1] in ("[", "{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON: {e}") from None
        if not isinstance(value, kind):
            raise ValueError(f"expected a JSON {'list' if kind is list else 'object'}")
        return value
    if not text:
        return []
    items = [i.strip() for i in text.split(",")]
    if any(not i for i in items):
        raise ValueError(f"{text!r}: an empty item between commas")
    return items


def _value_type(field: FieldInfo) -> Any:
    ann = field.annotation
    if get_origin(ann) in (Union, UnionType):
        ann = next(a for a in get_args(ann) if a is not type(None))
    args = get_args(ann)
    return args[1] if len(args) == 2 else Any


def _pairs(items: list[Any] | tuple[Any, ...], value_type: Any) -> dict[str, Any]:
    """KEY=VALUE items as a dict; a malformed item or a key given twice is an error, never dropped.

    Values of a `dict[str, Any]` setting are JSON when they parse (`n=2`, `x=true`, `l=[1,2]`)
    and strings otherwise.
    """
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{item!r}: expected KEY=VALUE")
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{item!r}: expected KEY=VALUE")
        if key in out:
            raise ValueError(f"{key!r} is given twice")
        if value_type is not str:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out


def setting_kind(field: FieldInfo) -> str:
    """'bool', 'list', 'dict' or 'scalar': how a setting is spelled on the command line."""
    ann = field.annotation
    args = [a for a in get_args(ann) if a is not type(None)] if get_origin(ann) in (Union, UnionType) else [ann]
    origins = {get_origin(a) or a for a in args}
    if origins == {bool}:
        return "bool"
    if origins & {list, tuple, set}:
        return "list"
    if origins & {dict}:
        return "dict"
    return "scalar"


