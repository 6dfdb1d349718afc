"""Generate the review sentiment dataset used by examples/sft.py.

Each example is a short, made-up product review, and the answer is exactly "positive" or
"negative". The reviews are assembled from the phrase lists below with a fixed seed, so
rerunning this script rewrites the same files:

    python examples/data/make_dataset.py

writes examples/data/reviews_train.jsonl and examples/data/reviews_eval.jsonl, one chat
example per line: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240611  # any fixed value; changing it changes every review
TRAIN_SIZE = 320
EVAL_SIZE = 80
LABELS = ("positive", "negative")

INSTRUCTION = "Is this product review positive or negative? Answer with one word: positive or negative."

PRODUCTS = [
    "blender", "desk lamp", "pair of hiking boots", "coffee grinder", "backpack", "phone case",
    "rice cooker", "yoga mat", "electric kettle", "office chair", "set of kitchen knives",
    "bluetooth speaker", "winter jacket", "toaster", "garden hose", "water bottle",
    "laptop stand", "pair of headphones", "vacuum cleaner", "board game", "umbrella",
    "air fryer", "wireless mouse", "sleeping bag", "wall clock", "frying pan",
    "fitness tracker", "suitcase", "space heater", "set of bed sheets",
]

BRANDS = [
    "Zentro", "Kolva", "Brightwell", "Nordhaven", "Pimlo", "Arcfield", "Tessaly", "Quillon",
    "Morrow & Vane", "Ostrava Home", "Lumetta", "Grayhill",
]

OPENERS = [
    "I bought the {brand} {product} last month.",
    "Got this {product} from {brand} as a birthday present.",
    "We have been using the {brand} {product} for a few weeks now.",
    "Ordered the {product} after reading a lot of reviews.",
    "My sister recommended the {brand} {product}.",
    "This is my second {product} from {brand}.",
    "Picked up this {product} on sale.",
    "I needed a new {product} for the apartment.",
]

NEUTRAL = [
    "It came in a plain cardboard box.",
    "The color is a dark gray.",
    "I mostly use it on weekends.",
    "Delivery took about four days.",
    "It is a bit smaller than the one I had before.",
    "The manual is printed in six languages.",
    "I use it almost every day.",
]

PRAISE = [
    "It works exactly as described.",
    "The build quality is excellent.",
    "It feels solid and well made.",
    "Setup took less than five minutes.",
    "It is quieter than I expected.",
    "Everything about it feels premium.",
    "It still works perfectly after daily use.",
    "The price is very fair for what you get.",
    "It exceeded my expectations.",
    "My whole family loves it.",
    "Customer service answered my question within an hour.",
    "It looks great in our kitchen.",
    "Honestly one of the best purchases I have made this year.",
    "It does the job quickly and without any fuss.",
    "The materials are sturdy and pleasant to touch.",
    "I was skeptical at first, but it won me over.",
]

COMPLAINTS = [
    "It stopped working after two days.",
    "The handle broke the first time I used it.",
    "It is much louder than advertised.",
    "The instructions were useless.",
    "It arrived scratched and missing a part.",
    "The quality feels cheap and flimsy.",
    "It smells like burnt plastic.",
    "Customer service never replied to my emails.",
    "It is not worth half the price.",
    "The battery dies within an hour.",
    "Nothing about it works the way the listing claims.",
    "It started falling apart within a week.",
    "I regret buying it.",
    "It is uncomfortable and awkward to use.",
    "The seams came loose almost immediately.",
    "I had high hopes, but it was a letdown.",
]

POSITIVE_CLOSERS = [
    "Would buy again.",
    "Highly recommended.",
    "Five stars from me.",
    "I already ordered one for my parents.",
    "Very happy with it.",
    "No complaints at all.",
]

NEGATIVE_CLOSERS = [
    "I am returning it.",
    "Save your money.",
    "One star.",
    "Do not buy this.",
    "Very disappointed.",
    "I want a refund.",
]


def make_review(rng: random.Random, label: str) -> str:
    sentiment_sentences = PRAISE if label == "positive" else COMPLAINTS
    closers = POSITIVE_CLOSERS if label == "positive" else NEGATIVE_CLOSERS

    sentences = [rng.choice(OPENERS).format(brand=rng.choice(BRANDS), product=rng.choice(PRODUCTS))]
    if rng.random() < 0.5:
        sentences.append(rng.choice(NEUTRAL))
    sentences.extend(rng.sample(sentiment_sentences, k=rng.randint(1, 2)))
    if rng.random() < 0.6:
        sentences.append(rng.choice(closers))
    return " ".join(sentences)


def make_example(review: str, label: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"{INSTRUCTION}\n\nReview: {review}"},
            {"role": "assistant", "content": label},
        ]
    }


def make_split_examples(rng: random.Random, count: int, seen_reviews: set[str]) -> list[dict]:
    """Draw `count` new reviews, half of each label, skipping any review already in seen_reviews."""
    examples = []
    for index in range(count):
        label = LABELS[index % len(LABELS)]
        review = make_review(rng, label)
        while review in seen_reviews:
            review = make_review(rng, label)
        seen_reviews.add(review)
        examples.append(make_example(review, label))
    rng.shuffle(examples)
    return examples


def write_jsonl(path: Path, examples: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as output:
        for example in examples:
            output.write(json.dumps(example, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent,
                        help="folder for reviews_train.jsonl and reviews_eval.jsonl (default: this script's folder)")
    args = parser.parse_args()

    rng = random.Random(SEED)
    seen_reviews: set[str] = set()
    train_examples = make_split_examples(rng, TRAIN_SIZE, seen_reviews)
    eval_examples = make_split_examples(rng, EVAL_SIZE, seen_reviews)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.output_dir / "reviews_train.jsonl", train_examples)
    write_jsonl(args.output_dir / "reviews_eval.jsonl", eval_examples)
    print(f"Wrote {len(train_examples)} train and {len(eval_examples)} eval examples to {args.output_dir}")


if __name__ == "__main__":
    main()
