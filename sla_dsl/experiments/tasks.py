"""How a run trains and is scored on each task: its training batches and its evaluation.

Data: training batches come from a generator seeded with the run's seed (fresh examples every step); the test
sets from generators with fixed seeds (EVAL_SEED + cell), so every model of a grid is scored on the same
examples (on one kind of device: CPU and CUDA generators give different streams).

Scores are over the labelled positions only. MQAR: accuracy = correct query answers / queries (Zoology).
Needle: accuracy = examples with every value token right (exact match), per (length, depth) cell; a run's
`accuracy` averages the cells at its training lengths, `extrapolation_accuracy` those beyond.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from sla_dsl.experiments.grid import Run
from sla_dsl.experiments.mqar import IGNORE, MQAR
from sla_dsl.experiments.niah import NeedleInHaystack

EVAL_SEED = 1_000_000_007  # far from any run seed: test examples never coincide with a training stream
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

# logits_fn(inputs [B, T]) -> logits [B, T, V] float32; the caller holds no_grad and autocast.
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(correct [B, T] bool, labelled [B, T] bool, summed cross entropy over the labelled positions)."""
    labelled = labels != IGNORE
    correct = (logits.argmax(-1) == labels) & labelled
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return correct, labelled, loss


class MQARTask:
    def __init__(self, run: Run):
        self.run = run
        self.task = MQAR(run.seq_len, run.kv_pairs, run.vocab_size)

    def train_batch(self, step: int, generator: torch.Generator):
        return self.task.sample(self.run.batch_size, generator)

    def evaluate(self, logits_fn: LogitsFn, device: torch.device) -> dict:
        generator = torch.Generator(device).manual_seed(EVAL_SEED)
        correct = labelled = 0
        loss = 0.0
        left = self.run.eval_examples
        while left > 0:
            batch = self.task.sample(min(self.run.batch_size, left), generator)
            right, mask, summed = score(logits_fn(batch.inputs), batch.labels)
            correct += int(right.sum())
            labelled += int(mask.sum())
            loss += float(summed)
            left -= batch.inputs.shape[0]
        return {"accuracy": correct / labelled, "loss": loss / labelled, "queries": labelled}

    def probe_inputs(self, device: torch.device) -> torch.Tensor:
        """A batch of test inputs for the gate diagnostics."""
        generator = torch.Generator(device).manual_seed(EVAL_SEED)
        return self.task.sample(min(self.run.batch_size, self.run.eval_examples), generator).inputs


class NeedleTask:
    def __init__(self, run: Run):
        self.run = run
        self.task = NeedleInHaystack(run.vocab_size)
        self.tokens_per_batch = run.batch_size * run.train_lens[0]

    def batch_size_at(self, length: int) -> int:
        return max(1, self.tokens_per_batch // length)

    def train_batch(self, step: int, generator: torch.Generator):
        length = self.run.train_lens[step % len(self.run.train_lens)]
        return self.task.sample(self.batch_size_at(length), length, generator)

    def evaluate(self, logits_fn: LogitsFn, device: torch.device) -> dict:
        cells = []
        for i, length in enumerate(self.run.eval_lens):
            for j, depth in enumerate(NEEDLE_DEPTHS):
                generator = torch.Generator(device).manual_seed(EVAL_SEED + 1000 * i + j)
                exact = tokens_right = tokens = 0
                loss = 0.0
                left = self.run.eval_examples
                while left > 0:
                    batch = self.task.sample(min(self.batch_size_at(length), left), length, generator, depth)
                    right, mask, summed = score(logits_fn(batch.inputs), batch.labels)
                    exact += int((right.sum(1) == mask.sum(1)).sum())
                    tokens_right += int(right.sum())
                    tokens += int(mask.sum())
                    loss += float(summed)
                    left -= batch.inputs.shape[0]
                cells.append({"length": length, "depth": depth, "accuracy": exact / self.run.eval_examples,
                              "token_accuracy": tokens_right / tokens, "loss": loss / tokens})
        trained = [c for c in cells if c["length"] in self.run.train_lens]
        beyond = [c for c in cells if c["length"] not in self.run.train_lens]
        mean = lambda rows, key: sum(r[key] for r in rows) / len(rows) if rows else None  # noqa: E731
        return {"accuracy": mean(trained, "accuracy"), "loss": mean(trained, "loss"),
                "extrapolation_accuracy": mean(beyond, "accuracy"), "cells": cells}

    def probe_inputs(self, device: torch.device) -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(EVAL_SEED)
        length = self.run.train_lens[0]
        return self.task.sample(min(self.batch_size_at(length), self.run.eval_examples), length, generator).inputs


def task_of(run: Run):
    return MQARTask(run) if run.task == "mqar" else NeedleTask(run)
