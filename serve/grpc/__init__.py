"""The gRPC transport: the Inference and Adapters services (thin servicers over the
transport-free services), health, reflection, TLS, and the edge that authenticates every call."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serve.config import ServerSettings
from serve.grpc.edge import GrpcEdge
from serve.grpc.proto import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc
from serve.grpc.servicers import AdaptersServicer, InferenceServicer
from serve.services.adapters import AdapterService
from serve.services.generation import GenerationService

__all__ = ["SERVICES", "GrpcServer"]

SERVICES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
)
MAX_MESSAGE_BYTES = 16 << 20
MAX_METADATA_BYTES = 16 << 10  # gRPC's default hard limit


class GrpcServer:
    """gRPC on `host:port` (TLS, and client certificates, if configured)."""

    def __init__(self, settings: ServerSettings, generation: GenerationService, adapters: AdapterService,
                 authenticate: Callable[[Any], Any]) -> None:
        self.settings = settings
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[GrpcEdge(authenticate, protected=SERVICES)],
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                     # One metadata limit: between gRPC's soft (8 KiB) and hard limits a call is
                     # refused at random, so the same call got RESOURCE_EXHAUSTED or reached the
                     # edge's authentication by chance. Larger calls are always refused.
                     ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                     ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES)],
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(generation), self.server)
        adapters_pb2_grpc.add_AdaptersServicer_to_server(AdaptersServicer(adapters), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        creds = self._credentials()
        address = f"{settings.host}:{settings.port}"
        self.port = self.server.add_secure_port(address, creds) if creds else self.server.add_insecure_port(address)
        self.security = ("TLS" + (" + client certificates" if settings.tls_client_ca else "")) if creds else "plaintext"

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if s.tls_cert is None:
            return None
        key, cert = Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes()
        ca = Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)
