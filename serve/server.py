"""`mora-serve`: the server process. Wires the parts together and runs their lifecycle.

Start-up: gRPC, health (NOT_SERVING) and metrics come up first, then the vLLM engine (tens of
seconds), then the preloaded adapters; only then does health say SERVING. SIGTERM starts a
graceful shutdown: health turns NOT_SERVING, new calls are refused, calls in flight get the
grace period to finish and are then aborted with UNAVAILABLE. If the engine dies, health turns
NOT_SERVING at once and the process exits non-zero so that Kubernetes restarts it.

The parts (docs/architecture.md): the engine face (serve/engine), the adapter lifecycle
(serve/adapters: registry, tiers, merges, resolver), the transport-free services
(serve/services), the transports (serve/grpc, serve/http), tenants and metrics.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time

from serve.adapters import AdapterRegistry, LazyResolver
from serve.config import ServerSettings, load_settings, parse_args
from serve.engine import Engine
from serve.engine.slots import resolve_slots
from serve.errors import ServeError
from serve.grpc import GrpcServer
from serve.http import HttpServer, build_app
from serve.metrics import ServerMetrics
from serve.monitor import monitor_engine
from serve.services.adapters import AdapterService
from serve.services.generation import GenerationService
from serve.tenants import Tenant, TenantDirectory

__all__ = ["Server", "main"]

log = logging.getLogger("mora.serve")
EXIT_ENGINE_DIED = 3
EXIT_STARTUP_FAILED = 2


class PreloadError(ValueError):
    """Preloaded adapters that cannot be served; raised before the engine starts."""


class Server:
    def __init__(self, settings: ServerSettings) -> None:
        settings = resolve_slots(settings)  # max_loras auto: sized by the slot memory budget
        self.settings = settings
        self.metrics = ServerMetrics(settings.metrics_label_limit)
        self.tenants = TenantDirectory.from_file(settings.tenants)
        self.engine = Engine(settings)
        self.registry = AdapterRegistry(settings, self.engine, self.tenants, on_event=self.metrics.record_operation)
        resolver = LazyResolver(self.registry, self.metrics.record_operation)
        self.generation = GenerationService(settings, self.engine, self.registry, resolver, self.tenants, self.metrics)
        self.adapters = AdapterService(self.registry, self.tenants)
        self.grpc: GrpcServer | None = None
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

    def _authenticate(self, metadata: object) -> Tenant:
        """The gRPC edge's authentication (every call to the mora services, before its request is
        parsed); a refusal is counted without labels (nothing unauthenticated becomes a label)."""
        try:
            return self.tenants.authenticate(metadata)  # type: ignore[arg-type]
        except ServeError:
            self.metrics.unauthenticated.labels("grpc").inc()
            raise

    async def _set_health(self, serving: bool) -> None:
        if self.grpc is not None:
            await self.grpc.set_serving(serving)
        self.metrics.engine_up.set(1 if serving else 0)

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
        self.grpc = GrpcServer(s, self.generation, self.adapters, self._authenticate)
        self.port = self.grpc.port
        await self._set_health(False)
        await self.grpc.start()
        if s.http_port:
            app = build_app(self.generation, self.adapters, self.tenants, self.metrics, self.base_model_names,
                            lambda: self.engine.ready and not self.stopping.is_set(), max_body_bytes=s.http_max_body_bytes)
            self.http = HttpServer(app, s.host, s.http_port, s.shutdown_grace_s)
            await self.http.start()
            log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", s.host, s.http_port)
        log.info("gRPC listening on %s:%d (%s); metrics on :%d; engine starting", s.host, self.port, self.grpc.security,
                 s.metrics_port)
        await self.engine.start()
        await self.registry.tiers.engine_started()
        for adapter_id, path in s.preload_map.items():
            await self.registry.load(adapter_id, path=path, owner=self.tenants.owner_of(adapter_id),  # caller None: the root
                                     pin=s.pin_preloaded)
        self.metrics.slots_capacity.set(s.max_loras)
        self.metrics.adapters_loaded.set_function(lambda: len(self.registry.entries))
        self.metrics.merge_backup_bytes.set_function(lambda: self.registry.merges.backup_bytes)
        self.metrics.snapshot_bytes.set_function(lambda: self.registry.disk_bytes)
        # What start-up built (torch, vLLM, the engine client: ~700k objects) lives as long as
        # the process; left to the cyclic GC, every full collection rescans it, a ~0.5 s stall
        # of the event loop that serves every tenant (vLLM's own API server freezes it too).
        gc.collect()
        gc.freeze()
        await self._set_health(True)
        self._tasks = [
            asyncio.create_task(self.registry.merges.run_policy(lambda: self.registry.entries.values(),
                                                                lambda: self.engine.ready, self.stopping)),
            asyncio.create_task(monitor_engine(self.engine, self.registry, self.metrics, self.stopping, self._engine_died)),
        ]
        log.info("serving %s with %d adapters", s.model, len(self.registry.entries))

    async def _engine_died(self) -> None:
        log.error("the engine died; health NOT_SERVING, exiting so that the pod restarts")
        await self._set_health(False)
        self.exit_code = EXIT_ENGINE_DIED
        self.stopping.set()

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
