"""One typed settings object, read from ``AIGEN_*`` environment variables.

Every setting is validated when the object is built, so a misconfiguration is caught at
start-up and reported as one line naming the variable (:func:`describe_error`); the full
list is in the README's configuration table.
"""

from __future__ import annotations

import importlib.util
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from saga.model import SagaConfig
from saga.pricing import PriceBook
from saga.retry import RetryPolicy

ROLES = ("service", "support")
DEV_API_KEYS = "service:dev-service-key,support:dev-support-key"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ENV_PREFIX = "AIGEN_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    data_dir: Path = Path(".aigen")
    database_url: str = ""  # empty: an SQLite file in data_dir
    amqp_url: str | None = None  # unset: in-process broker (single process only)
    api_keys: str | None = None  # "role:key,role:key"
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    http_keepalive_s: int = Field(30, ge=1)  # keep above the load balancer's idle timeout
    public_url: str | None = None  # base URL the demo worker puts in asset links

    samples_deadline_s: float = Field(120, gt=0)
    final_deadline_s: float = Field(600, gt=0)
    selection_window_s: float = Field(86400, gt=0)
    max_attempts: int = Field(3, ge=1)
    retry_backoff_s: float = Field(1.0, ge=0)
    retry_backoff_max_s: float = Field(30.0, ge=0)

    price_sample_round: Decimal = Decimal("0.25")
    price_final_standard: Decimal = Decimal("1.00")
    price_final_high: Decimal = Decimal("2.00")
    free_monthly_sample_rounds: int = Field(100, ge=0)
    storage_bucket: str = "creativeflow-assets"

    billing_url: str | None = None  # unset: the built-in ledger
    billing_timeout_s: float = Field(2.0, gt=0)
    # How old a `pending` external hold must be before the reaper releases it (and how often
    # it looks): far longer than a reservation request can take (see billing_timeout_s).
    billing_pending_grace_s: float = Field(60.0, gt=0)

    demo_worker: bool | None = None  # default: on with the in-process broker
    demo_delay_s: float = Field(0.5, ge=0)

    sweeper_interval_s: float = Field(0.5, gt=0)
    relay_batch_size: int = Field(500, ge=1)
    consumer_prefetch: int = Field(200, ge=1)
    # Threads applying result batches (and draining dead letters). With batching one is
    # enough and cheapest (bench: ~1.5 ms less CPU per generation than two); a failed
    # result waits for its retry on a timer (messaging/deferred.py), not in a worker.
    consumer_workers: int = Field(1, ge=1)
    # Results applied in one transaction at most (what is ready; 1: one per transaction).
    consumer_batch_size: int = Field(50, ge=1)
    db_pool_size: int = Field(10, ge=1)
    log_level: str = "INFO"
    log_json: bool = False

    # --- input policy and public surface (docs/input-rules.md)
    input_asset_hosts: str = ""  # hosts Odoo's URLs may name although internal: "minio,10.0.0.5"
    allow_http_assets: bool | None = None  # http:// result URLs; default: only when embedded
    public_docs: bool = True  # /docs, /redoc, /openapi.json without a key
    metrics_token: str | None = None  # set: /metrics needs "Authorization: Bearer <token>"

    @property
    def input_asset_host_list(self) -> tuple[str, ...]:
        return tuple(h.strip() for h in self.input_asset_hosts.split(",") if h.strip())

    @property
    def resolved_allow_http_assets(self) -> bool:
        return self.embedded if self.allow_http_assets is None else self.allow_http_assets

    # -- retry policy (saga/retry.py): one budget for everything that repeats a failure
    retry_base_s: float = Field(0.5, ge=0)
    retry_max_s: float = Field(30.0, ge=0)
    retry_jitter: float = Field(0.5, ge=0, le=1)
    retry_max_attempts: int = Field(8, ge=0)
    retry_max_elapsed_s: float | None = Field(None, gt=0)

    # Presigned download links for s3:// assets (api/asset_links.py); unset endpoint: none.
    s3_endpoint_url: str | None = None  # the S3/MinIO base URL browsers reach
    s3_region: str = Field("us-east-1", min_length=1)
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_presign_ttl_s: int = Field(3600, ge=1, le=604800)  # SigV4 allows at most 7 days
    s3_addressing_style: Literal["path", "virtual"] = "path"

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: str | None) -> str | None:
        if value:
            parse_api_keys(value)
        return value

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp(cls, value: str | None) -> str | None:
        if value and not value.startswith(("amqp://", "amqps://")):
            raise ValueError("expected an amqp:// or amqps:// URL")
        return value or None

    @field_validator("database_url")
    @classmethod
    def _check_database(cls, value: str) -> str:
        if value and not value.startswith(("sqlite:", "postgresql:", "postgresql+")):
            raise ValueError("expected a sqlite:/// or postgresql:// URL")
        return value

    @field_validator("billing_url", "public_url")
    @classmethod
    def _check_http_url(cls, value: str | None) -> str | None:
        if value and not (value.startswith(("http://", "https://")) and len(value) > 8):
            raise ValueError("expected an http:// or https:// URL")
        return value or None

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
        return value.upper()

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_s3_endpoint(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname \
                or parts.path.strip("/") or parts.query or parts.fragment or parts.username:
            raise ValueError("expected an http:// or https:// base URL with no path, "
                             "e.g. https://minio.example.com")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _s3_links_complete(self) -> Settings:
        keys = {"AIGEN_S3_ACCESS_KEY_ID": self.s3_access_key_id,
                "AIGEN_S3_SECRET_ACCESS_KEY": self.s3_secret_access_key}
        if self.s3_endpoint_url is None:
            given = [name for name, v in keys.items() if v]
            if given:
                raise ValueError(f"{' and '.join(given)} set without AIGEN_S3_ENDPOINT_URL "
                                 "(the S3 base URL browsers reach)")
            return self
        missing = [name for name, v in keys.items() if not v]
        if missing:
            raise ValueError(f"AIGEN_S3_ENDPOINT_URL is set: {' and '.join(missing)} "
                             "must be set too")
        if importlib.util.find_spec("botocore") is None:
            raise ValueError("AIGEN_S3_ENDPOINT_URL is set but botocore is not installed: "
                             "pip install 'aigen-orchestrator[s3]'")
        return self

    @model_validator(mode="after")
    def _keys_with_broker(self) -> Settings:
        if self.amqp_url and not self.api_keys:
            raise ValueError("AIGEN_API_KEYS must be set when AIGEN_AMQP_URL is set "
                             "(role:key pairs, e.g. service:KEY1,support:KEY2)")
        return self

    @property
    def embedded(self) -> bool:
        return not self.amqp_url

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'aigen.db'}"

    @property
    def run_demo_worker(self) -> bool:
        return self.embedded if self.demo_worker is None else self.demo_worker

    def resolved_api_keys(self) -> dict[str, str]:
        """key -> role. Development keys only in the embedded mode; otherwise keys are required."""
        if self.api_keys:
            return parse_api_keys(self.api_keys)
        if self.embedded:
            return parse_api_keys(DEV_API_KEYS)
        raise ValueError("AIGEN_API_KEYS must be set when AIGEN_AMQP_URL is set")

    def saga_config(self) -> SagaConfig:
        return SagaConfig(
            samples_deadline=timedelta(seconds=self.samples_deadline_s),
            final_deadline=timedelta(seconds=self.final_deadline_s),
            selection_window=timedelta(seconds=self.selection_window_s),
            max_attempts=self.max_attempts,
            retry_backoff_base=timedelta(seconds=self.retry_backoff_s),
            retry_backoff_max=timedelta(seconds=self.retry_backoff_max_s),
            prices=PriceBook(self.price_sample_round, self.price_final_standard,
                             self.price_final_high, self.free_monthly_sample_rounds),
            bucket=self.storage_bucket,
            allow_http_assets=self.resolved_allow_http_assets,
            compensation_backoff_base=timedelta(seconds=self.retry_base_s),
            compensation_backoff_max=timedelta(seconds=self.retry_max_s),
            compensation_max_tries=self.retry_max_attempts,
            compensation_jitter=self.retry_jitter,
        )

    def retry_policy(self) -> RetryPolicy:
        """The one retry policy every retrying component is built with."""
        return RetryPolicy(base=self.retry_base_s, cap=self.retry_max_s,
                           jitter=self.retry_jitter, max_attempts=self.retry_max_attempts,
                           max_elapsed=self.retry_max_elapsed_s)


def parse_api_keys(value: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for pair in value.split(","):
        pair = pair.strip()
        if not pair:
            continue
        role, sep, key = pair.partition(":")
        if not sep or role not in ROLES or not key:
            raise ValueError(f"AIGEN_API_KEYS entries must be role:key with role in {ROLES}")
        keys[key] = role
    return keys


def describe_error(exc: ValidationError) -> str:
    """One line per misconfiguration: ``AIGEN_HTTP_PORT: expected …, got 'abc'``."""
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p != "__root__"]
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if message.startswith("Input should be "):  # pydantic's wording, made an expectation
            message = "expected " + message.removeprefix("Input should be ").split(",")[0]
        if not loc:  # a model-level check: its message names the variables itself
            parts.append(message)
            continue
        name = ENV_PREFIX + loc[0].upper()
        given = error.get("input")
        suffix = f", got {given!r}" if isinstance(given, str | int | float) else ""
        parts.append(f"{name}: {message}{suffix}")
    return "; ".join(parts)
