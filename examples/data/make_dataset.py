"""Generate the example task: pull order details out of a sentence into one fixed line.

    python examples/data/make_dataset.py      # rewrites train/validation/test.jsonl here

The answer pattern (`ORDER name=...; item=...; qty=...; city=...`) is ours, so the base
model cannot already follow it and a short LoRA run shows a clear drop in held-out loss.
Deterministic (seeded), chat format, a few hundred rows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Julia",
         "Kenji", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq"]
ITEMS = ["lamp", "kettle", "backpack", "notebook", "chair", "umbrella", "headphones", "mug",
         "blanket", "bicycle bell", "desk fan", "water bottle", "toaster", "scarf", "wall clock"]
CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Porto", "Seoul", "Quito",
          "Perth", "Dakar", "Turin", "Hanoi", "Bergen", "Cusco"]
TEMPLATES = [
    "Hi, this is {name}. Please send {qty} {item}s to my place in {city}.",
    "{name} from {city} would like to order {qty} x {item}.",
    "Order request: {qty} units of {item}, ship to {city}, customer {name}.",
    "Could you deliver {qty} {item}s to {city}? Thanks, {name}",
    "New order by {name}: {item} (quantity {qty}), destination {city}.",
    "I'm {name} and I need {qty} {item}s delivered in {city} next week.",
]
INSTRUCTION = "Extract the order from this message."
SYSTEM = "You process shop orders."  # short: templates add a long default system prompt


def row(rng: random.Random) -> dict[str, object]:
    name, item, city = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CITIES)
    qty = rng.randint(1, 12)
    text = rng.choice(TEMPLATES).format(name=name, item=item, city=city, qty=qty)
    answer = f"ORDER name={name}; item={item}; qty={qty}; city={city}"
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"{INSTRUCTION}\n{text}"},
                         {"role": "assistant", "content": answer}]}


def main() -> None:
    rng = random.Random(20240611)  # noqa: S311 (example data, not a secret)
    here = Path(__file__).parent
    for split, count in (("train", 320), ("validation", 48), ("test", 48)):
        lines = [json.dumps(row(rng)) for _ in range(count)]
        (here / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
