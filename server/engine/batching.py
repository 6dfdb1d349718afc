"""Grouping of examples into right-padded micro-batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.engine.backend import Example


@dataclass
class MicroBatch:
    indices: list[int]  # positions of these examples in the request
    tokens: torch.Tensor  # (batch, length) int64, right-padded with 0
    mask: torch.Tensor  # (batch, length) float32, 1 on real tokens
    inputs: dict[str, torch.Tensor]  # loss inputs padded like `tokens`, target_tokens as int64 and the rest float32


def plan_micro_batches(lengths: list[int], max_padded_tokens: int) -> list[list[int]]:
    """Group example indices so that each group's padded size (count x longest) stays within the bound.

    Examples are taken longest first, which keeps padding small. An example longer than the bound
    gets a micro-batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and (len(current) + 1) * lengths[current[0]] > max_padded_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def pad_micro_batch(examples: list[Example], indices: list[int]) -> MicroBatch:
    width = max(len(examples[index].tokens) for index in indices)

    def pad(values: torch.Tensor) -> torch.Tensor:
        return F.pad(values, (0, width - values.shape[0]))

    chosen = [examples[index] for index in indices]
    tokens = torch.stack([pad(torch.as_tensor(example.tokens, dtype=torch.int64)) for example in chosen])
    mask = torch.stack([pad(torch.ones(len(example.tokens))) for example in chosen])
    inputs: dict[str, torch.Tensor] = {}
    names = sorted({name for example in chosen for name in example.loss_inputs})
    for name in names:
        dtype = torch.int64 if name == "target_tokens" else torch.float32
        rows = []
        for example in chosen:
            # Only optional inputs can be missing, and the only one, `weights`, defaults to 1.
            value = example.loss_inputs.get(name, torch.ones(len(example.tokens)))
            rows.append(pad(torch.as_tensor(value).to(dtype)))
        inputs[name] = torch.stack(rows)
    return MicroBatch(indices, tokens, mask, inputs)
