"""Schemas of the results n8n publishes (docs/messages.md). Unknown extra fields are tolerated
(producers may add some); missing fields and wrong JSON types are not."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Id = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Url = Annotated[str, StringConstraints(min_length=1, max_length=2048)]
Px = Annotated[int, Field(ge=1, le=16384)]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class Sample(_Msg):
    sample_id: Id
    url: Url
    width: Px
    height: Px


class Asset(_Msg):
    url: Url
    width: Px
    height: Px
    format: Annotated[str, StringConstraints(max_length=16)] = "png"


class ResultError(_Msg):
    code: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    message: Annotated[str, StringConstraints(max_length=2000)] = ""
    retryable: bool = False


class _Result(_Msg):
    generation_id: Id
    job_id: Id
    event_id: Id | None = None
    # {"traceparent": "00-…"}, copied from the job (tracing). Never validated: a missing or
    # malformed one only starts a new trace, it is no reason to refuse the result.
    trace: Any = None


class SamplesReady(_Result):
    event_type: Literal["AIGenerationSamplesReady"]
    samples: list[Sample] = Field(min_length=1, max_length=4)
    model: Annotated[str, StringConstraints(max_length=128)] | None = None
    duration_ms: Annotated[int, Field(ge=0)] | None = None


class FinalAssetReady(_Result):
    event_type: Literal["AIGenerationFinalAssetReady"]
    asset: Asset


class Failed(_Result):
    event_type: Literal["AIGenerationFailed"]
    error: ResultError


class Progress(_Result):
    event_type: Literal["AIGenerationProgress"]
    percent: Annotated[int, Field(ge=0, le=100)]


Result = Annotated[SamplesReady | FinalAssetReady | Failed | Progress,
                   Field(discriminator="event_type")]
