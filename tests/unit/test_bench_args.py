"""The throughput bench refuses a run whose users would pass the free plan's monthly quota.

Past ``users * free_monthly_sample_rounds`` generations every start is refused, so a long run
(the 100k memory run) would go on measuring refusals; the bench says so before it starts.
"""

from __future__ import annotations

import subprocess
import sys

from saga.pricing import PriceBook


def test_too_few_users_for_the_generations_is_refused_before_anything_starts() -> None:
    rounds = PriceBook().free_monthly_sample_rounds
    result = subprocess.run(
        [sys.executable, "-m", "bench.throughput", "--generations", str(rounds * 10 + 1),
         "--users", "10"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "need at least 11 users" in result.stderr
