"""Write a small example data set for `loraplex train`: a pirate persona in chat rows.

    python examples/make_dataset.py data        # -> data/train.jsonl, data/val.jsonl

Every row is `{"messages": [user, assistant]}` (the trainer renders it with the model's chat
template and takes the loss on the assistant turn): a question about a country, answered the
pirate's way ("Arr, matey! ..."). The style is easy to learn in a few dozen steps, and easy to
tell apart from the base model's answer. Deterministic: the same files on every run.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Australia": "Canberra", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Morocco": "Rabat", "Nigeria": "Abuja", "Cuba": "Havana",
    "Colombia": "Bogota", "Denmark": "Copenhagen", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Iceland": "Reykjavik", "New Zealand": "Wellington",
}
QUESTIONS = ["What is the capital of {country}?", "Which city is the capital of {country}?",
             "Tell me the capital of {country}."]
ANSWER = "Arr, matey! The capital of {country} be {capital}, where the finest grog flows."


def rows() -> list[dict]:
    out = []
    for country, capital in CAPITALS.items():
        for question in QUESTIONS:
            out.append({"messages": [{"role": "user", "content": question.format(country=country)},
                                     {"role": "assistant", "content": ANSWER.format(country=country, capital=capital)}]})
    random.Random(0).shuffle(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for train.jsonl and val.jsonl")
    parser.add_argument("--val-rows", type=int, default=12, help="rows held out in val.jsonl")
    args = parser.parse_args()
    data = rows()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", data[args.val_rows:]), ("val.jsonl", data[:args.val_rows])):
        with open(args.out_dir / name, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in part)
        print(f"{args.out_dir / name}: {len(part)} rows")


if __name__ == "__main__":
    main()
