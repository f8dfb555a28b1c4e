"""Writes src/swarmgate/canaries.json: the canary prompts and, for each bundled model a
node can load here, the answer the real llama.cpp backend gives (greedy, fixed seed).

    .venv/bin/python scripts/make_canary_references.py [--models ID ...] [--merge]

Run it again when the prompts, the models or llama.cpp change; the gateway compares
devices' answers with these references with a tolerance (trust/canary.py). Greedy
answers can differ between builds for different processors (AVX-512, AVX2, ARM):
``--merge`` keeps the references already in the file and adds this machine's answer to
a prompt as an accepted alternative where it differs from all of them.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import orjson

from swarmgate.node.backends.base import Finished, GenerationRequest, TokenDelta
from swarmgate.node.backends.llama_cpp import LlamaCppBackend
from swarmgate.protocol import ChatMessage, SamplingParams

PROMPTS = [
    "Count from one to ten in words, separated by commas.",
    "What is the capital of France? Answer in one short sentence.",
    "Name the four seasons of the year.",
    "Write one sentence about the sea.",
    "List three colours of the rainbow.",
    "Complete the sentence: The quick brown fox",
]
MAX_TOKENS = 24
SEED = 1234
OUT = Path(__file__).resolve().parents[1] / "src" / "swarmgate" / "canaries.json"


async def answer(backend: LlamaCppBackend, model: str, prompt: str) -> str:
    request = GenerationRequest(
        job_id="reference",
        model=model,
        messages=[ChatMessage(role="user", content=prompt)],
        params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, top_p=1.0, seed=SEED),
        stream=True,
    )
    parts: list[str] = []
    async for event in backend.generate(request):
        if isinstance(event, TokenDelta):
            parts.append(event.text)
        elif isinstance(event, Finished):
            break
    return "".join(parts)


def _accepted(entry: str | list[str]) -> list[str]:
    return [entry] if isinstance(entry, str) else list(entry)


async def main(models: list[str], merge: bool) -> None:
    existing: dict[str, dict[str, list[str | list[str]]]] = {}
    if merge and OUT.exists():
        old = orjson.loads(OUT.read_bytes())
        if old["prompts"] != PROMPTS or old["max_tokens"] != MAX_TOKENS or old["seed"] != SEED:
            raise SystemExit("the prompts changed: make new references without --merge")
        existing = old["references"]
    references: dict[str, dict[str, list[str | list[str]]]] = dict(existing)
    for model in models:
        backend = LlamaCppBackend()
        await backend.load([model])
        answers = [await answer(backend, model, p) for p in PROMPTS]
        await backend.close()
        before = existing.get(model, {}).get("llama-cpp")
        if before is None:
            references[model] = {"llama-cpp": list(answers)}
            continue
        merged: list[str | list[str]] = []
        for entry, new in zip(before, answers, strict=True):
            accepted = _accepted(entry)
            if new not in accepted:
                accepted.append(new)
            merged.append(accepted[0] if len(accepted) == 1 else accepted)
        references[model] = {**references.get(model, {}), "llama-cpp": merged}
    data = {"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "seed": SEED, "references": references}
    OUT.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct-q4_1"])
    parser.add_argument("--merge", action="store_true", help="add to the existing references")
    args = parser.parse_args()
    asyncio.run(main(args.models, args.merge))
