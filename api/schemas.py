"""Request bodies (contract §3). Strict: unknown fields and wrong JSON types are refused."""

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

from saga.model import FORMATS

FormatName = Literal[
    "instagram_post", "instagram_story", "instagram_reel", "facebook_post", "linkedin_post",
    "twitter_post", "tiktok", "youtube_thumbnail", "pinterest_pin", "custom",
]
Plan = Literal["free", "pro", "team", "enterprise"]
State = Literal["requested", "processing_samples", "awaiting_selection", "processing_final",
                "compensating", "completed", "failed", "timed_out", "cancelled", "expired"]

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
    resolution: Literal["standard", "high"] = "standard"


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
