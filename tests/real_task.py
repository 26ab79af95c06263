"""A small real task for the `real` tests: pull the city out of a sentence and answer with its name alone.

An instruct model answers "Extract the city: I flew to Lisbon last week." in a sentence ("The city mentioned is
Lisbon."), so its exact match is near zero; the format is what tuning teaches, which a short QLoRA run on a 135M
model learns. Rows are generated (seeded), so no data enters the repository; held-out rows use cities and
sentence shapes the training rows never show, so exact match measures the learned format, not memorised rows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TRAIN_CITIES = (
    "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Dublin", "Oslo", "Stockholm",
    "Helsinki", "Athens", "Cairo", "Nairobi", "Lagos", "Tokyo", "Seoul", "Beijing", "Delhi", "Mumbai",
    "Bangkok", "Jakarta", "Manila", "Sydney", "Toronto", "Chicago", "Boston", "Denver", "Seattle", "Lima",
)
HELD_OUT_CITIES = ("Lisbon", "Budapest", "Copenhagen", "Istanbul", "Hanoi", "Melbourne", "Montreal", "Bogota",
                   "Santiago", "Dallas", "Osaka", "Munich")
TRAIN_SHAPES = (
    "I flew to {city} last week.",
    "My sister has lived in {city} for ten years.",
    "The conference this year is in {city}.",
    "We spent our holiday walking around {city}.",
    "Our company opened a new office in {city}.",
    "The train to {city} leaves at noon.",
    "She grew up in {city} before moving abroad.",
    "Tickets for the concert in {city} sold out fast.",
)
HELD_OUT_SHAPES = (
    "Next spring my parents are visiting {city}.",
    "The best coffee I ever had was in {city}.",
    "He got a job offer from a startup in {city}.",
)
PROMPT = "Extract the city: {sentence}"


def rows(cities, shapes, n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        city = rng.choice(cities)
        out.append({"prompt": PROMPT.format(sentence=rng.choice(shapes).format(city=city)), "completion": city})
    return out


def write_task(folder: Path, n_train: int = 96, n_valid: int = 12) -> tuple[Path, Path]:
    """train.jsonl and valid.jsonl of the task in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, data in (("train", rows(TRAIN_CITIES, TRAIN_SHAPES, n_train, seed=1)),
                       ("valid", rows(HELD_OUT_CITIES, HELD_OUT_SHAPES, n_valid, seed=2))):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
        files.append(path)
    return files[0], files[1]
