"""Everything the shipped n8n workflow talks to, started together for one run.

Order matters: the vhost and the contract topology come first (the trigger does not assert its
queue, so n8n cannot activate before the orchestrator-owned queue exists), then the S3 and
image-model stand-ins, then n8n itself. Teardown runs in reverse and never skips a step.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from .image_api import ImageApiStub
from .rabbit import RabbitVhost, declare_contract_topology
from .runner import AmqpTarget, N8nConfig, N8nRunner
from .s3 import S3Stub


class N8nStack:
    """vhost + topology + moto S3 + image API stand-in + n8n; a context manager."""

    def __init__(
        self,
        parallel_messages: int | None = None,
        extra_env: dict[str, str] | None = None,
        image_model: str = "aigen-test-model",
        model_latency_s: float = 0.0,
        declare_topology: Callable[[RabbitVhost], None] | None = None,
    ) -> None:
        self.vhost = RabbitVhost()
        # Who declares the contract topology in the fresh vhost before n8n activates: the
        # harness's copy by default; an end-to-end test passes the orchestrator's own
        # declaration (e.g. ``RabbitBroker(vhost.url).declare()``) so the queue arguments n8n
        # meets are exactly the orchestrator's.
        self.declare_topology = declare_topology
        self.s3 = S3Stub()
        self.image_api = ImageApiStub(latency_s=model_latency_s)
        self.parallel_messages = parallel_messages
        self.extra_env = extra_env or {}
        self.image_model = image_model
        self.n8n: N8nRunner | None = None

    def start(self) -> N8nStack:
        try:
            self.vhost.create()
            if self.declare_topology is not None:
                self.declare_topology(self.vhost)
            else:
                with self.vhost.connect() as conn:
                    declare_contract_topology(conn)
            self.s3.start()
            self.image_api.start()
            cfg = N8nConfig(
                amqp=AmqpTarget(
                    host=self.vhost.host,
                    port=self.vhost.port,
                    username=self.vhost.username,
                    password=self.vhost.password,
                    vhost=self.vhost.name,
                ),
                s3_endpoint=self.s3.endpoint,
                s3_region=self.s3.region,
                s3_access_key_id=self.s3.access_key_id,
                s3_secret_access_key=self.s3.secret_access_key,
                image_api_base_url=self.image_api.base_url,
                image_api_key=self.image_api.api_key or "",
                image_model=self.image_model,
                parallel_messages=self.parallel_messages,
                extra_env=self.extra_env,
            )
            self.n8n = N8nRunner(cfg).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop n8n first (it holds connections into the vhost), then the stand-ins."""
        errors: list[BaseException] = []
        for step in (self._stop_n8n, self.image_api.stop, self.s3.stop, self.vhost.delete):
            try:
                step()
            except Exception as exc:  # keep tearing down; report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]

    def _stop_n8n(self) -> None:
        n8n, self.n8n = self.n8n, None
        if n8n is not None:
            n8n.stop()

    def __enter__(self) -> N8nStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        except Exception:
            if exc is None:  # do not mask the error that ended the block
                raise
