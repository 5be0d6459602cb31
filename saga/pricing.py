"""Price book, plans and the free plan's monthly quota (docs/api.md, credits).

Amounts are :class:`~decimal.Decimal` with two places everywhere; nothing here is a float.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, get_args

Stage = Literal["samples", "final"]
Resolution = Literal["standard", "high"]

Plan = Literal["free", "pro", "team", "enterprise"]
PLANS: tuple[str, ...] = get_args(Plan)
CENT = Decimal("0.01")
ZERO = Decimal("0.00")

# Longest side of a final asset, per resolution.
FINAL_LONGEST_SIDE: dict[str, int] = {"standard": 2048, "high": 4096}


def money(value: Decimal | str | int) -> Decimal:
    """Normalise an amount to two decimal places."""
    return Decimal(value).quantize(CENT)


def fmt(value: Decimal) -> str:
    """Render an amount as the contract's decimal string (``"0.25"``)."""
    return str(money(value))


@dataclass(frozen=True)
class PriceBook:
    sample_round: Decimal = Decimal("0.25")
    final_standard: Decimal = Decimal("1.00")
    final_high: Decimal = Decimal("2.00")
    free_monthly_sample_rounds: int = 100

    def price(self, plan: str, stage: Stage, resolution: Resolution | None = None) -> Decimal:
        """What ``plan`` pays for one ``stage``; ``free`` pays all, others only high finals."""
        if stage == "samples":
            amount = self.sample_round if plan == "free" else ZERO
        elif resolution == "high":
            amount = self.final_high
        else:
            amount = self.final_standard if plan == "free" else ZERO
        return money(amount)

    def quota_applies(self, plan: str, stage: str) -> bool:
        return plan == "free" and stage == "samples"


def final_output(width: int, height: int, resolution: Resolution) -> tuple[int, int]:
    """Scale ``width`` x ``height`` so that its longest side is the resolution's target."""
    target = FINAL_LONGEST_SIDE[resolution]
    longest = max(width, height)
    return round(width * target / longest), round(height * target / longest)


def month_key(year: int, month: int) -> str:
    return f"{year:04d}-{month:02d}"
