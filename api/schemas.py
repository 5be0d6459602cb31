"""Request bodies and response shapes of the REST API.

Bodies are strict: unknown fields and wrong JSON types are refused. Literals (states, plans,
formats, resolutions) come from ``saga``, so the schema cannot drift from the rules.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from saga.machine import State
from saga.model import FORMATS, FormatName
from saga.pricing import Plan, Resolution

__all__ = ["FormatName", "Plan", "State"]  # the saga's literals, re-exported for the routes

_URL = re.compile(r"^(https?|s3)://[^\s/$.?#][^\s]*$", re.IGNORECASE)
_HEX = re.compile(r"^#(?:[0-9a-fA-F]{3}){1,2}$")
_AMOUNT = re.compile(r"^\d{1,10}(\.\d{1,2})?$")
METADATA_MAX_BYTES = 4096

Str64 = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Prompt = Annotated[str, StringConstraints(min_length=1, max_length=4000)]
Short = Annotated[str, StringConstraints(max_length=100)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Style(Strict):
    tone: Short | None = None
    industry: Short | None = None
    preset: Short | None = None


class Brand(Strict):
    colors: list[str] = Field(default_factory=list, max_length=10)
    logo_url: Annotated[str, StringConstraints(max_length=2048)] | None = None

    @field_validator("colors")
    @classmethod
    def _hex(cls, colors: list[str]) -> list[str]:
        for color in colors:
            if not _HEX.match(color):
                raise ValueError(f"{color!r} is not a #RGB or #RRGGBB colour")
        return colors

    @field_validator("logo_url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is not None and not _URL.match(url):
            raise ValueError("must be an http(s) or s3 URL")
        return url


class StartGenerationBody(Strict):
    user_id: Str64
    prompt: Prompt
    negative_prompt: Annotated[str, StringConstraints(max_length=4000)] | None = None
    format: FormatName
    width: Annotated[int, Field(ge=64, le=4096)] | None = Field(None, validate_default=True)
    height: Annotated[int, Field(ge=64, le=4096)] | None = Field(None, validate_default=True)
    style: Style = Field(default_factory=Style)
    brand: Brand = Field(default_factory=Brand)
    input_assets: list[Annotated[str, StringConstraints(max_length=2048)]] = Field(
        default_factory=list, max_length=5)
    sample_count: Annotated[int, Field(ge=1, le=4)] = 4
    project_id: Str64 | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("input_assets")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not _URL.match(url):
                raise ValueError(f"{url!r} is not an http(s) or s3 URL")
        return urls

    @field_validator("metadata")
    @classmethod
    def _small(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode())
        if size > METADATA_MAX_BYTES:
            raise ValueError(f"must be at most {METADATA_MAX_BYTES} bytes as JSON")
        return metadata

    @field_validator("width", "height")
    @classmethod
    def _dimensions(cls, value: int | None, info: ValidationInfo) -> int | None:
        custom = info.data.get("format") == "custom"
        if custom and value is None:
            raise ValueError("is required with format 'custom'")
        if not custom and value is not None and "format" in info.data:
            raise ValueError("is only accepted with format 'custom'")
        return value

    def format_spec(self) -> dict[str, Any]:
        if self.format == "custom":
            return {"name": "custom", "width": self.width, "height": self.height}
        width, height = FORMATS[self.format]
        return {"name": self.format, "width": width, "height": height}


class SelectionBody(Strict):
    sample_id: Str64
    resolution: Resolution = "standard"


class RegenerateBody(Strict):
    prompt: Prompt | None = None


class CancelBody(Strict):
    reason: Annotated[str, StringConstraints(max_length=500)] | None = None


class SetPlanBody(Strict):
    plan: Plan


class GrantBody(Strict):
    amount: Annotated[str, StringConstraints(max_length=16)]
    reason: Annotated[str, StringConstraints(min_length=1, max_length=255)]

    @field_validator("amount")
    @classmethod
    def _decimal(cls, amount: str) -> str:
        if not _AMOUNT.match(amount) or Decimal(amount) <= 0:
            raise ValueError("must be a positive decimal string with at most two places, "
                             "e.g. \"10.00\"")
        return amount


# ------------------------------------------------------------------ responses
class Out(BaseModel):
    """Response shapes: documented in OpenAPI; the saga's views fill them."""

    model_config = ConfigDict(extra="forbid")


class Credits(Out):
    held: str
    charged: str
    released: str


class Attention(Out):
    """Set while the saga is parked for support; ``null`` otherwise."""

    reason: str
    since: str
    kind: Literal["timer", "compensation", "result"]


class GenerationOut(Out):
    id: str
    state: State
    user_id: str
    project_id: str | None
    prompt: str
    format: dict[str, Any]
    sample_count: int
    samples: list[dict[str, Any]]
    selected_sample_id: str | None
    final_asset: dict[str, Any] | None
    credits: Credits
    error: dict[str, Any] | None
    attempt: int
    deadline_at: str | None
    created_at: str
    updated_at: str
    metadata: dict[str, Any]
    attention: Attention | None = None


class GenerationPage(Out):
    items: list[GenerationOut]
    next_cursor: str | None


class HistoryEvent(Out):
    seq: int
    at: str
    kind: str
    trigger: str | None
    from_state: str | None
    to_state: str | None
    actor: str
    detail: dict[str, Any]


class HistoryOut(Out):
    id: str
    state: State
    events: list[HistoryEvent]


class AccountOut(Out):
    user_id: str
    plan: Plan
    balance: str
    held: str
    available: str


class GrantReceipt(Out):
    amount: str
    reason: str


class GrantOut(AccountOut):
    grant: GrantReceipt


class Live(Out):
    status: Literal["ok"]


class Ready(Out):
    status: Literal["ok", "unavailable"]
    checks: dict[str, bool]


# ------------------------------------------------------------------ attention (parking)
class SupportRetryBody(Strict):
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)]


class AttentionItem(Out):
    generation_id: str
    user_id: str
    state: State
    attention: Attention


class AttentionPage(Out):
    items: list[AttentionItem]
    next_cursor: str | None
