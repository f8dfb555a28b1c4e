"""Swarmgate: an OpenAI-compatible gateway whose models run on devices people own."""

__version__ = "0.1.0"
