"""The model catalog: what the network offers, at what price, from which artifact."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field


class Pricing(BaseModel):
    model_config = ConfigDict(frozen=True)

    # Micro-dollars per one million tokens: integers, so no float touches money.
    input_per_1m_micros: int = Field(ge=0)
    output_per_1m_micros: int = Field(ge=0)


# The zero price: a constant, so the request path does not build one.
FREE = Pricing(input_per_1m_micros=0, output_per_1m_micros=0)


class Artifact(BaseModel):
    model_config = ConfigDict(frozen=True)

    filename: str
    url: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    size_bytes: int | None = None


class UpstreamModel(BaseModel):
    """Where a cloud or hybrid model runs upstream: the upstream's name (as configured by
    the operator) and the model's name there."""

    model_config = ConfigDict(frozen=True)

    upstream: str
    model: str


class CatalogModel(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    type: Literal["llm"] = "llm"
    description: str
    context_length: int
    # p2p: devices only; cloud: upstreams only; hybrid: devices first, then upstreams.
    tier: Literal["p2p", "cloud", "hybrid"]
    pricing: Pricing
    artifact: Artifact | None = None
    upstreams: tuple[UpstreamModel, ...] = ()  # in failover order


class Catalog:
    def __init__(self, models: list[CatalogModel]) -> None:
        self._by_id = {model.id: model for model in models}

    def get(self, model_id: str) -> CatalogModel | None:
        return self._by_id.get(model_id)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def accepts_artifact(self, model_id: str, sha256: str | None) -> bool:
        """A device may serve a catalog model only with the catalog's artifact, where known."""
        model = self._by_id.get(model_id)
        if model is None:
            return False
        expected = model.artifact.sha256 if model.artifact else None
        return expected is None or sha256 == expected

    @classmethod
    def load(cls, path: Path | None = None) -> Catalog:
        if path is None:
            raw = resources.files("swarmgate").joinpath("catalog.json").read_bytes()
        else:
            raw = path.read_bytes()
        data = orjson.loads(raw)
        return cls([CatalogModel.model_validate(item) for item in data["models"]])
