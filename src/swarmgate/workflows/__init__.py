"""Orchestration workflows: multi-step jobs with budgets."""
