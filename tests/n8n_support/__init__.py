"""Harness to run the shipped n8n workflow (aigen/n8n/) against a real, pinned n8n.

Stand-ins on loopback replace the outside world: moto for MinIO/S3, an OpenAI-compatible
images API for the model, and a throw-away RabbitMQ vhost per run. See docs/n8n.md.
"""

from .image_api import ImageApiStub
from .rabbit import RabbitVhost, declare_contract_topology
from .runner import (
    N8N_VERSION,
    AmqpTarget,
    N8nConfig,
    N8nRunner,
    N8nStatus,
    N8nUnavailable,
    ensure_installed,
    n8n_available,
    running_n8n,
)
from .s3 import S3Stub, parse_s3_url
from .stack import N8nStack

__all__ = [
    "N8N_VERSION",
    "AmqpTarget",
    "ImageApiStub",
    "N8nConfig",
    "N8nRunner",
    "N8nStack",
    "N8nStatus",
    "N8nUnavailable",
    "RabbitVhost",
    "S3Stub",
    "declare_contract_topology",
    "ensure_installed",
    "n8n_available",
    "parse_s3_url",
    "running_n8n",
]
