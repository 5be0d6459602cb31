"""Moved to :mod:`standins.billing`; re-exported for existing imports."""

from standins.billing import BillingStandIn

__all__ = ["BillingStandIn"]
