"""Billing: pricing arithmetic and the double-entry ledger, in integer micro-dollars only."""
