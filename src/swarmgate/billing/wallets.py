"""Credit held in memory for requests in flight: the arithmetic of the request path.

The ledger (``billing/ledger.py``) is the record of money; a database transaction per
hold and per settlement would cost more CPU than everything else a request does. So a
request's hold is a *reservation* in the gateway's memory, and only its settlement —
the actual charge — is written, committed together with other charges (group commit,
``billing/settlement.py``) before the answer leaves the gateway.

Per developer book the gateway keeps a ``Wallet``::

    available = committed - pending - reserved

``committed``   the book's balance as the database last reported it, minus the charges
                this gateway has committed since;
``pending``     charges queued for the next commit (the money is spent, not yet written);
``reserved``    the most that the requests now running may still cost.

A reservation is taken only if ``available`` covers it, and every charge is at most its
reservation, so ``committed - pending`` never goes below zero: a charge never finds the
database balance short. A wallet may lag behind money that arrived from outside this
process (an admin top-up from the CLI); before refusing a request for want of credit,
the gateway re-reads the balance, so the lag can only delay a refusal, never an overdraw.

A key's daily spend cap works the same way over ``KeySpend`` (today's committed,
pending and reserved spend of one key; the day is the UTC calendar day).

This is the single-process implementation; gateways sharing one database keep the same
arithmetic in Redis (``cluster/wallets.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date


@dataclass(slots=True)
class Wallet:
    committed: int
    pending: int = 0
    reserved: int = 0

    @property
    def available(self) -> int:
        return self.committed - self.pending - self.reserved

    def can_reserve(self, amount: int) -> bool:
        return amount <= self.available

    def reserve(self, amount: int) -> None:
        if amount > self.available:
            raise ValueError(f"cannot reserve {amount}: {self.available} available")
        self.reserved += amount

    def release(self, amount: int) -> None:
        if amount > self.reserved:
            raise ValueError(f"releasing {amount} but only {self.reserved} is reserved")
        self.reserved -= amount

    def charge(self, reserved: int, charged: int) -> None:
        """A reservation becomes a pending charge of at most its size."""
        if not 0 <= charged <= reserved:
            raise ValueError(f"charge {charged} outside its reservation of {reserved}")
        self.release(reserved)
        self.pending += charged

    def committed_charge(self, charged: int) -> None:
        """The charge reached the database."""
        self.pending -= charged
        self.committed -= charged

    def failed_charge(self, charged: int) -> None:
        """The charge could not be written: nothing was spent."""
        self.pending -= charged

    def resync(self, database_balance: int) -> None:
        """The balance read from the database while no charge of ours was in flight."""
        self.committed = database_balance


@dataclass(slots=True)
class KeySpend:
    """One key's spend on one UTC day, for its daily cap."""

    day: date
    committed: int
    pending: int = 0
    reserved: int = 0

    @property
    def total(self) -> int:
        return self.committed + self.pending + self.reserved

    def would_pass(self, cap: int, amount: int) -> bool:
        return self.total + amount > cap
