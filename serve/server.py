"""`mora-serve`: the server process: gRPC, and the OpenAI-compatible HTTP API on `--http-port`.

Start-up: gRPC, health (NOT_SERVING) and metrics come up first, then the vLLM engine (tens of
seconds), then the preloaded adapters; only then does health say SERVING. SIGTERM starts a
graceful shutdown: health turns NOT_SERVING, new calls are refused, calls in flight get the
grace period to finish and are then aborted with UNAVAILABLE. If the engine dies, health turns
NOT_SERVING at once and the process exits non-zero so that Kubernetes restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serve.adapter_service import AdapterService, location_of
from serve.config import ServerSettings, load_settings, parse_args
from serve.engine import Engine
from serve.errors import ErrorInterceptor, ServeError
from serve.generation import GenerationService
from serve.http import HttpServer, build_app
from serve.metrics import ServerMetrics
from serve.policy import MergePolicy
from serve.proto import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc
from serve.registry import AdapterRegistry
from serve.servicers import AdaptersServicer, InferenceServicer
from serve.tenants import TenantDirectory

__all__ = ["Server", "main"]

log = logging.getLogger("mora.serve")
SERVICES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
)
EXIT_ENGINE_DIED = 3
EXIT_STARTUP_FAILED = 2


class PreloadError(ValueError):
    """Preloaded adapters that cannot be served; raised before the engine starts."""


class Server:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics(settings.metrics_label_limit)
        self.tenants = TenantDirectory.from_file(settings.tenants)
        self.engine = Engine(settings)
        self.registry = AdapterRegistry(settings, self.engine, self.tenants, on_event=self.metrics.record_operation)
        self.policy = MergePolicy(window_s=settings.merge_window_s, merge_share=settings.merge_share,
                                  unmerge_share=settings.unmerge_share, min_requests=settings.merge_min_requests,
                                  min_dwell_s=settings.merge_min_dwell_s)
        self.generation = GenerationService(settings, self.engine, self.registry, self.tenants, self.metrics, self.policy)
        self.adapters = AdapterService(self.registry, self.tenants)
        self.health = health.aio.HealthServicer()
        self.grpc: grpc.aio.Server | None = None
        self.http: HttpServer | None = None
        self.port = 0
        self.stopping = asyncio.Event()
        self.exit_code = 0
        self._tasks: list[asyncio.Task] = []

    @property
    def base_model_names(self) -> list[str]:
        """The base model's names in the OpenAI API's `model` field: vLLM's served_model_name if set,
        else the model directory's name (the same name vLLM's metrics carry; never a path)."""
        served = self.settings.engine.get("served_model_name")
        names = [served] if isinstance(served, str) else list(served or [])
        return names or [self.settings.model_name]

    def _authenticate(self, metadata: object) -> object:
        """The gRPC edge's authentication (every call to the mora services, before its request is
        parsed); a refusal is counted without labels (nothing unauthenticated becomes a label)."""
        try:
            return self.tenants.authenticate(metadata)  # type: ignore[arg-type]
        except ServeError:
            self.metrics.unauthenticated.labels("grpc").inc()
            raise

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICES):
            await self.health.set(name, status)
        self.metrics.engine_up.set(1 if serving else 0)

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if s.tls_cert is None:
            return None
        key, cert = Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes()
        ca = Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    async def _prevalidate_preloads(self) -> None:
        """Every preload checked (id, path, config, shapes vs config.json) before the engine starts:
        a bad entry fails start-up in seconds, naming every bad item, instead of after the model load."""
        problems = []
        for adapter_id, path in self.settings.preload_map.items():
            try:
                await asyncio.to_thread(self.registry.prevalidate, adapter_id, path)
            except ServeError as e:
                problems.append(f"preload {adapter_id}={path}: {e}")
        if problems:
            raise PreloadError("\n".join(problems))

    async def start(self) -> None:
        s = self.settings
        await self._prevalidate_preloads()
        if s.metrics_port:
            self.metrics.serve(s.metrics_port, s.host, bearer_token_file=s.metrics_bearer_token_file,
                               certfile=s.metrics_tls_cert, keyfile=s.metrics_tls_key)
        self.grpc = grpc.aio.server(
            interceptors=[ErrorInterceptor(self._authenticate, protected=SERVICES)],
            options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)],
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.generation), self.grpc)
        adapters_pb2_grpc.add_AdaptersServicer_to_server(AdaptersServicer(self.adapters), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        creds = self._credentials()
        address = f"{s.host}:{s.port}"
        self.port = self.grpc.add_secure_port(address, creds) if creds else self.grpc.add_insecure_port(address)
        await self._set_health(False)
        await self.grpc.start()
        if s.http_port:
            app = build_app(self.generation, self.adapters, self.tenants, self.metrics, self.base_model_names,
                            lambda: self.engine.ready and not self.stopping.is_set(), max_body_bytes=s.http_max_body_bytes)
            self.http = HttpServer(app, s.host, s.http_port, s.shutdown_grace_s)
            await self.http.start()
            log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", s.host, s.http_port)
        log.info("gRPC listening on %s:%d (%s); metrics on :%d; engine starting", s.host, self.port,
                 "TLS" + (" + client certificates" if s.tls_client_ca else "") if creds else "plaintext", s.metrics_port)
        await self.engine.start()
        for adapter_id, path in s.preload_map.items():
            await self.registry.load(adapter_id, path=path, owner=self.tenants.owner_of(adapter_id),  # caller None: the root
                                     pin=s.pin_preloaded)
        self.metrics.slots_capacity.set(s.max_loras)
        self.metrics.adapters_loaded.set_function(lambda: len(self.registry.entries))
        self.metrics.merge_backup_bytes.set_function(lambda: self.registry.merge_backup_bytes)
        self.metrics.snapshot_bytes.set_function(lambda: self.registry.disk_bytes)
        await self._set_health(True)
        self._tasks = [asyncio.create_task(self._policy_loop()), asyncio.create_task(self._monitor_loop())]
        log.info("serving %s with %d adapters", s.model, len(self.registry.entries))

    async def _policy_loop(self) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(self.settings.policy_interval_s)
            if not self.settings.auto_merge or not self.engine.ready or self.engine.quantization:
                continue
            reg = self.registry
            self.policy.transitioned(reg.last_transition)  # unmerges for other adapters' requests count too
            merged = reg.merged[0] if reg.merged else None
            manual = [a for a, e in reg.entries.items() if e.manual_merge]

            def eligible(a: str, reg: AdapterRegistry = reg) -> bool:
                e = reg.entries.get(a)
                return e is not None and not e.manual_merge and not e.unloading and reg.merge_refusal(e) is None

            decision = self.policy.decide(time.monotonic(), merged, eligible, manual)
            if decision is None:
                continue
            log.info("merge policy: %s %s (%s)", decision.action, decision.adapter_id, decision.reason)
            try:
                if decision.action == "merge":
                    await reg.merge(decision.adapter_id, manual=False, trigger="auto")
                else:
                    await reg.unmerge(decision.adapter_id, manual=False, trigger="auto")
            except ServeError as e:
                log.warning("merge policy: %s %s failed: %s", decision.action, decision.adapter_id, e)
            self.policy.transitioned(time.monotonic())

    async def _monitor_loop(self) -> None:
        while not self.stopping.is_set():
            if self.engine.dead or not await self.engine.check_health():
                log.error("the engine died; health NOT_SERVING, exiting so that the pod restarts")
                await self._set_health(False)
                self.exit_code = EXIT_ENGINE_DIED
                self.stopping.set()
                return
            with contextlib.suppress(Exception):
                status = await self.engine.status()
                reg = self.registry
                states = {}
                for a, e in reg.entries.items():
                    states[a] = ("merged" if reg.merged and reg.merged[0] == a else location_of(e, status).value, e.tenant)
                self.metrics.set_residency(states)
                self.metrics.set_page_ins(reg.page_in_counts)
                self.metrics.slots_in_use.set(len(status.get("slots", {})))
                reg.set_host_view(list(status.get("registered", [])))
                self.metrics.record_tiers(await self.engine.rpc("mora_tier_stats"))
            await asyncio.sleep(1.0)

    async def shutdown(self) -> None:
        grace = self.settings.shutdown_grace_s
        log.info("shutting down: refusing new calls, %gs for the %d in flight", grace, self.generation.pending)
        await self._set_health(False)
        for t in self._tasks:
            t.cancel()
        if self.http is not None:
            self.http.refuse_new()  # stops accepting; requests in flight are in generation.pending
        if self.grpc is not None:
            # The gRPC listener stays open while calls drain, and new calls get our own UNAVAILABLE
            # ("shutting down"), which clients retry on another replica. Stopping gRPC's server first
            # would answer them from gRPC core instead: CANCELLED or a reset, depending on timing.
            self.generation.draining.set()
            deadline = time.monotonic() + grace
            while self.generation.pending and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            aborted = await self.generation.abort_all()
            if aborted:
                log.warning("%d requests did not finish within the grace period: returned UNAVAILABLE", aborted)
            await self.grpc.stop(2.0)
        if self.http is not None:
            await self.http.stop()
        self.engine.shutdown()
        self.registry.close()
        log.info("stopped")


async def run(settings: ServerSettings) -> int:
    server = Server(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stopping.set)
    try:
        start = asyncio.create_task(server.start())
        stop_wait = asyncio.create_task(server.stopping.wait())
        done, _ = await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if start in done and start.exception() is not None:
            log.error("start-up failed: %s", start.exception())
            server.exit_code = EXIT_STARTUP_FAILED
            server.stopping.set()
        elif start not in done:
            start.cancel()
        await server.stopping.wait()
    finally:
        await server.shutdown()
    return server.exit_code


def main(argv: list[str] | None = None) -> int:
    cli, config_file = parse_args(argv)
    try:
        settings = load_settings(cli, config_file)
    except (ValueError, OSError) as e:
        print(f"mora-serve: invalid configuration:\n{e}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
