"""LoRA fine-tuning of SmolLM2 on review sentiment, through the Tinker API of a trainpulse server.

Start a server, then run:

    python examples/sft.py --base-url http://127.0.0.1:8000 [--steps N] [--batch-size B] \
        [--learning-rate LR] [--rank R] [--model NAME]

The script uses only the `tinker` SDK (0.22.0). It measures exact-match accuracy on
examples/data/reviews_eval.jsonl by greedy sampling, trains a LoRA adapter on
examples/data/reviews_train.jsonl with cross-entropy on the answer tokens, and measures again.
The SDK requires an API key that starts with "tml-". The script reads it from TINKER_API_KEY and
otherwise sends "tml-trainpulse-local", which a server started without --api-key accepts.

The data comes from examples/data/make_dataset.py. An answer counts as correct only if the
sampled text, stripped of surrounding whitespace, is exactly "positive" or "negative" as expected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import tinker
from tinker import types

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_API_KEY = "tml-trainpulse-local"
MAX_ANSWER_TOKENS = 8  # "positive" and "negative" are one or two tokens plus the end-of-turn token
SAMPLE_CONCURRENCY = 8  # sampling requests in flight at once during evaluation
SHOWN_ANSWERS = 5  # sampled answers printed per evaluation
PROGRESS_BAR_WIDTH = 30


@dataclass
class Example:
    prompt_tokens: list[int]  # the chat up to and including the assistant header
    answer: str
    answer_tokens: list[int]  # the answer followed by the end-of-turn token


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LoRA fine-tuning of a base model on review sentiment "
                                                 "through a Tinker-compatible server.")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server URL (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model name (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the LoRA initialization and the batch order "
                                                            "(default: %(default)s)")
    parser.add_argument("--train-file", type=Path, default=DATA_DIR / "reviews_train.jsonl",
                        help="chat examples to train on, JSONL (default: %(default)s)")
    parser.add_argument("--eval-file", type=Path, default=DATA_DIR / "reviews_eval.jsonl",
                        help="chat examples to measure accuracy on, JSONL (default: %(default)s)")
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 1 or args.rank < 1:
        parser.error("--steps, --batch-size and --rank must be at least 1")
    return args


def load_examples(path: Path, tokenizer) -> list[Example]:
    """Read chat examples whose last message is the assistant's answer, and tokenize them."""
    examples = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            messages = json.loads(line)["messages"]
            prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            answer = messages[-1]["content"]
            examples.append(Example(
                prompt_tokens=tokenizer.encode(prompt_text, add_special_tokens=False),
                answer=answer,
                answer_tokens=tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id],
            ))
    return examples


def make_datum(example: Example) -> types.Datum:
    """Build a datum that predicts every next token but weights only the answer's tokens."""
    tokens = example.prompt_tokens + example.answer_tokens
    weights = [0.0] * len(example.prompt_tokens) + [1.0] * len(example.answer_tokens)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
    )


async def evaluate(training_client: tinker.TrainingClient, tokenizer, examples: list[Example], title: str) -> float:
    """Sample a greedy answer to each example with the current weights and return the exact-match accuracy."""
    sampling_client = await training_client.save_weights_and_get_sampling_client_async()
    params = types.SamplingParams(max_tokens=MAX_ANSWER_TOKENS, temperature=0.0, stop=[tokenizer.eos_token_id])
    limit = asyncio.Semaphore(SAMPLE_CONCURRENCY)

    async def sample_answer(example: Example) -> str:
        async with limit:
            response = await sampling_client.sample_async(
                prompt=types.ModelInput.from_ints(example.prompt_tokens), num_samples=1, sampling_params=params)
        return tokenizer.decode(response.sequences[0].tokens, skip_special_tokens=True).strip()

    started_s = time.monotonic()
    answers = await asyncio.gather(*(sample_answer(example) for example in examples))
    correct = sum(answer == example.answer for answer, example in zip(answers, examples))
    accuracy = correct / len(examples)

    print(f"\n{title}: {correct}/{len(examples)} correct ({accuracy:.1%}) in {time.monotonic() - started_s:.1f} s")
    for answer, example in list(zip(answers, examples))[:SHOWN_ANSWERS]:
        mark = "ok  " if answer == example.answer else "miss"
        print(f"  {mark} expected {example.answer!r:12} sampled {answer!r}")
    return accuracy


def progress_bar(done: int, total: int) -> str:
    filled = round(PROGRESS_BAR_WIDTH * done / total)
    return "[" + "#" * filled + "." * (PROGRESS_BAR_WIDTH - filled) + "]"


async def main() -> None:
    args = parse_args()
    api_key = os.environ.get("TINKER_API_KEY", DEFAULT_API_KEY)

    service_client = tinker.ServiceClient(base_url=args.base_url, api_key=api_key)
    training_client = await service_client.create_lora_training_client_async(
        base_model=args.model, rank=args.rank, seed=args.seed)
    tokenizer = training_client.get_tokenizer()
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"The tokenizer of {args.model} has no end-of-turn (eos) token to stop sampling at.")

    train_examples = load_examples(args.train_file, tokenizer)
    eval_examples = load_examples(args.eval_file, tokenizer)
    print(f"Model {args.model}, LoRA rank {args.rank}: {len(train_examples)} train and "
          f"{len(eval_examples)} eval examples")

    accuracy_before = await evaluate(training_client, tokenizer, eval_examples, "Accuracy before training")

    # Batches walk through the train set in a seeded random order, reshuffled every epoch.
    rng = random.Random(args.seed)
    order: list[int] = []
    adam_params = types.AdamParams(learning_rate=args.learning_rate)
    print(f"\nTraining {args.steps} steps of {args.batch_size} examples, learning rate {args.learning_rate}")
    training_started_s = time.monotonic()
    for step in range(1, args.steps + 1):
        step_started_s = time.monotonic()
        if len(order) < args.batch_size:
            order = rng.sample(range(len(train_examples)), len(train_examples)) + order
        batch = [train_examples[order.pop()] for _ in range(args.batch_size)]
        answer_token_count = sum(len(example.answer_tokens) for example in batch)

        # Submitting both requests before awaiting either lets the server queue the optimizer
        # step right behind the gradients, with no round trip in between.
        forward_backward_future = await training_client.forward_backward_async(
            [make_datum(example) for example in batch], loss_fn="cross_entropy")
        optim_future = await training_client.optim_step_async(adam_params)
        forward_backward_result = await forward_backward_future.result_async()
        await optim_future.result_async()

        loss_per_token = forward_backward_result.metrics["loss:sum"] / answer_token_count
        print(f"{progress_bar(step, args.steps)} step {step:3d}/{args.steps} "
              f"loss/token {loss_per_token:.4f} ({time.monotonic() - step_started_s:.1f} s)", flush=True)
    print(f"Trained in {time.monotonic() - training_started_s:.0f} s")

    accuracy_after = await evaluate(training_client, tokenizer, eval_examples, "Accuracy after training")
    print(f"\nAccuracy on {len(eval_examples)} eval examples: {accuracy_before:.1%} -> {accuracy_after:.1%}")


if __name__ == "__main__":
    asyncio.run(main())
