"""What a job costs and who earns it: pure integer arithmetic on micro-dollars.

Money is an ``int`` of micro-dollars (1 USD = 1_000_000) everywhere; no float ever
takes part, so every result here is exact and reproducible on any machine.

Rounding rule — **one ceiling, taken last.** A catalog price is micro-dollars per
one million tokens, so the exact cost of a job is the rational number

    (prompt_tokens * input_per_1m + completion_tokens * output_per_1m) / 1_000_000

micro-dollars. The developer is charged the ceiling of that number: the sum of both
parts first, then one division rounded up. So

* a job that used any priced token costs at least 1 micro-dollar (tiny jobs are
  never free by rounding, and splitting work into many tiny jobs does not dodge
  the price);
* the overcharge is below 1 micro-dollar per job (less than $0.000001), never one
  per part, because the two parts are added before rounding;
* the cost is monotonic in both token counts, so a hold priced for ``max_tokens``
  always covers the settled cost of a job that stopped at or before ``max_tokens``.

Earnings split — **the provider's share rounds down, the platform takes the rest.**
``provider = amount * bps // 10_000`` and ``platform = amount - provider``; the two
parts always add back to ``amount``, so no micro-dollar is created or lost.
"""

from __future__ import annotations

from swarmgate.catalog import Pricing
from swarmgate.errors import RequestError

TOKENS_PER_PRICE_UNIT = 1_000_000  # catalog prices are per one million tokens
BASIS_POINTS = 10_000  # 100.00 %
PROVIDER_SHARE_BPS = 8_500  # providers earn 85 % of each job
# One ledger operation may move at most $1 billion: far above any real charge, far
# below the 64-bit column limit, so no plausible sum of operations overflows BIGINT
# (SQLite would silently turn an overflowing integer into a float).
MAX_AMOUNT_MICROS = 10**15


def _require_count(value: int, name: str) -> None:
    # bool is an int subclass; True tokens is a bug, not one token.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} cannot be negative, got {value}")


def require_micros(value: int, name: str = "amount_micros", *, allow_zero: bool = False) -> int:
    """Refuses anything but a plain int in range: a float here is a bug, not a price."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int of micro-dollars, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero) or value > MAX_AMOUNT_MICROS:
        low = 0 if allow_zero else 1
        raise RequestError(f"{name} must be {low}..{MAX_AMOUNT_MICROS}, got {value}", param=name)
    return value


def job_cost_micros(pricing: Pricing, prompt_tokens: int, completion_tokens: int) -> int:
    """The developer's charge for a job: ceil of the exact cost (see the module docstring)."""
    # ``type(...) is int`` first: the checks run on every request, the calls only on a bug.
    if type(prompt_tokens) is not int or prompt_tokens < 0:
        _require_count(prompt_tokens, "prompt_tokens")
    if type(completion_tokens) is not int or completion_tokens < 0:
        _require_count(completion_tokens, "completion_tokens")
    scaled = (
        prompt_tokens * pricing.input_per_1m_micros
        + completion_tokens * pricing.output_per_1m_micros
    )
    return -(-scaled // TOKENS_PER_PRICE_UNIT)  # the ceiling, as scaled ≥ 0


def max_cost_micros(pricing: Pricing, prompt_tokens: int, max_tokens: int) -> int:
    """The most a request may cost: what a hold reserves before the job runs.

    Same rounding as ``job_cost_micros``, so for any completion of at most
    ``max_tokens`` tokens the settled cost never exceeds the hold.
    """
    return job_cost_micros(pricing, prompt_tokens, max_tokens)


def split_earnings(
    amount_micros: int, provider_share_bps: int = PROVIDER_SHARE_BPS
) -> tuple[int, int]:
    """Splits a charged amount into (provider, platform); the parts sum to ``amount_micros``.

    The provider's share is rounded down and the platform keeps the remainder, so
    rounding never pays out money the developer did not pay.
    """
    if type(amount_micros) is not int or amount_micros < 0:
        _require_count(amount_micros, "amount_micros")
    if type(provider_share_bps) is not int or provider_share_bps < 0:
        _require_count(provider_share_bps, "provider_share_bps")
    if provider_share_bps > BASIS_POINTS:
        raise ValueError(f"provider_share_bps must be at most {BASIS_POINTS}")
    provider = amount_micros * provider_share_bps // BASIS_POINTS
    return provider, amount_micros - provider
