"""Request bodies and response shapes of the REST API.

Bodies are strict: unknown fields and wrong JSON types are refused. Literals (states, plans,
formats, resolutions) come from ``saga``, so the schema cannot drift from the rules.

Over 300 lines on purpose: every request body and response model in one place, the one
source of the OpenAPI document.
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
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from saga.input_policy import (
    InvalidAmount,
    check_odoo_url,
    check_user_id,
    depth_exceeds,
    parse_amount,
)
from saga.machine import State
from saga.model import FORMATS, FormatName
from saga.pricing import Plan, Resolution

__all__ = ["FormatName", "Plan", "State"]  # the saga's literals, re-exported for the routes

_HEX = re.compile(r"^#(?:[0-9a-fA-F]{3}){1,2}$")
# The amount rule of saga.input_policy.parse_amount (ASCII digits, at most two places, more
# than zero) for the OpenAPI document only: parse_amount itself does the checking.
AMOUNT_PATTERN = r"^(?![0.]*$)[0-9]{1,10}(\.[0-9]{1,2})?$"
# A superset of what check_odoo_url accepts, for the document (which hosts are internal is
# beyond any pattern): a string it does not match is refused.
ODOO_URL_PATTERN = r"^(?:[hH][tT][tT][pP][sS]?|[sS]3)://[^\s\\@/?#]+(?:[/?#][^\s\\]*)?$"
METADATA_MAX_BYTES = 4096

Str64 = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Prompt = Annotated[str, StringConstraints(min_length=1, max_length=4000)]
Short = Annotated[str, StringConstraints(max_length=100)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _odoo_url(url: str, info: ValidationInfo) -> str:
    """The internal-address rule for URLs Odoo hands on to n8n (docs/input-rules.md)."""
    allowed = (info.context or {}).get("input_asset_hosts", ())
    reason = check_odoo_url(url, allowed)
    if reason is not None:
        raise ValueError(reason)
    return url


def _user_id(value: str) -> str:
    reason = check_user_id(value)
    if reason is not None:
        raise ValueError(reason)
    return value


# saga.input_policy.check_user_id as a JSON Schema pattern, exact for ASCII (one segment, no
# control character, no white space at either end, not . or ..); the Unicode categories the
# rule also refuses (format, unassigned, private-use...) cannot be written in a pattern.
_UC, _UE = r"[^\x00-\x1f\x7f/\\]", r"[^\x00-\x20\x7f/\\]"
_UN = r"[^\x00-\x20\x7f/\\.]"
USER_ID_PATTERN = rf"^(?:{_UN}|{_UN}{_UE}|{_UE}{_UN}|{_UE}{_UC}{{1,62}}{_UE})$"
UserId = Annotated[str, StringConstraints(min_length=1, max_length=64),
                   Field(json_schema_extra={"pattern": USER_ID_PATTERN})]
OdooUrl = Annotated[str, StringConstraints(min_length=1, max_length=2048),
                   Field(json_schema_extra={"pattern": ODOO_URL_PATTERN})]


class Style(Strict):
    tone: Short | None = None
    industry: Short | None = None
    preset: Short | None = None


class Brand(Strict):
    colors: list[str] = Field(default_factory=list, max_length=10)
    logo_url: OdooUrl | None = None

    @field_validator("colors")
    @classmethod
    def _hex(cls, colors: list[str]) -> list[str]:
        for color in colors:
            if not _HEX.match(color):
                raise ValueError(f"{color!r} is not a #RGB or #RRGGBB colour")
        return colors

    @field_validator("logo_url")
    @classmethod
    def _url(cls, url: str | None, info: ValidationInfo) -> str | None:
        return None if url is None else _odoo_url(url, info)


class StartGenerationBody(Strict):
    user_id: UserId
    prompt: Prompt
    negative_prompt: Annotated[str, StringConstraints(max_length=4000)] | None = None
    format: FormatName
    width: Annotated[int, Field(ge=64, le=4096)] | None = Field(None, validate_default=True)
    height: Annotated[int, Field(ge=64, le=4096)] | None = Field(None, validate_default=True)
    style: Style = Field(default_factory=Style)
    brand: Brand = Field(default_factory=Brand)
    input_assets: list[OdooUrl] = Field(default_factory=list, max_length=5)
    sample_count: Annotated[int, Field(ge=1, le=4)] = 4
    project_id: Str64 | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("input_assets")
    @classmethod
    def _urls(cls, urls: list[str], info: ValidationInfo) -> list[str]:
        errors = []
        for index, url in enumerate(urls):
            try:
                _odoo_url(url, info)
            except ValueError as exc:
                errors.append(InitErrorDetails(type=PydanticCustomError(
                    "url_refused", "{reason}", {"reason": str(exc)}), loc=(index,), input=url))
        if errors:
            raise ValidationError.from_exception_data("input_assets", errors)
        return urls

    @field_validator("user_id")
    @classmethod
    def _safe_user_id(cls, value: str) -> str:
        return _user_id(value)

    @field_validator("metadata")
    @classmethod
    def _small(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        if depth_exceeds(metadata):  # the body's own limit already caught this; a guard
            raise ValueError("is nested too deeply")
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
    amount: Annotated[str, Field(max_length=16, json_schema_extra={"pattern": AMOUNT_PATTERN},
                                 description="A positive decimal string of ASCII digits with "
                                             "at most two places, e.g. \"10.00\".",
                                 examples=["10.00"])]
    reason: Annotated[str, StringConstraints(min_length=1, max_length=255)]

    @field_validator("amount", mode="before")
    @classmethod
    def _decimal(cls, amount: object) -> object:
        # Before pydantic's own checks: its pattern matches Unicode digits and "5\n".
        try:
            parse_amount(amount)
        except InvalidAmount as exc:
            raise ValueError(str(exc)) from None
        return amount

    def decimal(self) -> Decimal:
        return parse_amount(self.amount)


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
    trace_id: str | None = Field(
        default=None, description="OpenTelemetry trace id the event was written in "
        "(32 hex digits); null when tracing is off")


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
