"""Writes words_and_code.jsonl: minitron's shipped offline multiple-choice task.

`python minitron/task_data/make_words_and_code.py` rewrites the file byte for byte from the lists
below, which were written for this task (the training corpus, the Python standard library
source, is not used). Two kinds of four-way items, each with one right answer:
- opposites: "The opposite of hot is" -> cold, among the opposites of three other words;
- code: `def square(x):\n    return` -> `x * x`, among the bodies of three other functions that
  take the same arguments (so every choice is valid Python; only one fits the name).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 19
# Pairs whose opposite is unambiguous; every pair is asked both ways.
OPPOSITES = [
    ("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("happy", "sad"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("rich", "poor"), ("wet", "dry"),
    ("hard", "soft"), ("heavy", "light"), ("thick", "thin"), ("strong", "weak"), ("tall", "short"),
    ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("day", "night"), ("north", "south"),
    ("east", "west"), ("left", "right"), ("inside", "outside"), ("above", "below"),
    ("before", "after"), ("first", "last"), ("true", "false"), ("yes", "no"),
    ("always", "never"), ("friend", "enemy"), ("question", "answer"), ("clean", "dirty"),
    ("loud", "quiet"), ("sweet", "sour"), ("war", "peace"), ("love", "hate"),
    ("begin", "end"), ("arrive", "leave"), ("remember", "forget"), ("accept", "refuse"),
]
# name -> body, grouped by argument list so that distractors take the same arguments.
FUNCTIONS = {
    "x": {"square": "x * x", "cube": "x ** 3", "negate": "-x", "absolute": "abs(x)",
          "double": "x * 2", "half": "x / 2", "increment": "x + 1", "decrement": "x - 1",
          "is_positive": "x > 0", "is_negative": "x < 0", "is_zero": "x == 0",
          "is_even": "x % 2 == 0", "to_string": "str(x)", "reciprocal": "1 / x"},
    "a, b": {"add": "a + b", "subtract": "a - b", "multiply": "a * b", "divide": "a / b",
             "power": "a ** b", "remainder": "a % b", "maximum": "max(a, b)",
             "minimum": "min(a, b)", "is_equal": "a == b", "is_greater": "a > b",
             "average": "(a + b) / 2"},
    "items": {"total": "sum(items)", "largest": "max(items)", "smallest": "min(items)",
              "count": "len(items)", "first": "items[0]", "last": "items[-1]",
              "reverse": "items[::-1]", "sort": "sorted(items)", "is_empty": "len(items) == 0",
              "mean": "sum(items) / len(items)", "unique": "set(items)"},
    "text": {"shout": "text.upper()", "whisper": "text.lower()", "strip": "text.strip()",
             "words": "text.split()", "title_case": "text.title()", "length": "len(text)",
             "is_number": "text.isdigit()", "first_letter": "text[0]",
             "count_spaces": "text.count(' ')", "lines": "text.splitlines()"},
}


def _item(prompt: str, answer: str, pool: list[str], kind: str, rng: random.Random) -> dict:
    choices = rng.sample(sorted(set(pool) - {answer}), 3) + [answer]
    rng.shuffle(choices)
    return {"kind": kind, "prompt": prompt, "choices": choices, "label": choices.index(answer)}


def make_items() -> list[dict]:
    rng = random.Random(SEED)
    items = []
    pairs = OPPOSITES + [(b, a) for a, b in OPPOSITES]
    words = [b for _, b in pairs]
    for word, opposite in pairs:
        items.append(_item(f"The opposite of {word} is", opposite, words, "opposites", rng))
    for args, bodies in FUNCTIONS.items():
        for name, body in bodies.items():
            items.append(_item(f"def {name}({args}):\n    return", body, list(bodies.values()),
                               "code", rng))
    rng.shuffle(items)
    return items


def load(**_metadata):
    """The task's dataset for lm-eval (`custom_dataset` in words_and_code.yaml): the JSONL beside
    this file, read with no network and no datasets cache."""
    import datasets

    path = Path(__file__).with_name("words_and_code.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def main() -> None:
    out = Path(__file__).with_name("words_and_code.jsonl")
    lines = [json.dumps(item, sort_keys=True) for item in make_items()]
    out.write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} items -> {out}")


if __name__ == "__main__":
    main()
