"""One run: build (or reuse) the model, train it, evaluate it, read its gates.

Model: `sla_dsl.nn.LanguageModel` (embeddings tied to the head, pre-norm blocks of SpecAttention + SwiGLU), the
short convolution on. Models are pooled by `Run.model_key()`: a run with a key seen before reuses that module
(and its torch.compile graphs) and only loads freshly initialised parameters into it, built from the run's
seed exactly as a new model would be. Compiling costs ~20-40 s per model, reusing costs nothing.

Training (Zoology-like): AdamW (betas 0.9/0.98, weight decay on matrices only), linear warm-up over
`warmup_fraction` of the steps then cosine decay to zero, gradient clipping at 1, bf16 autocast on CUDA. A loss
that is not finite stops the run early; it is still evaluated and recorded with `diverged: true` (a learning
rate that diverges is a result of the sweep, not an error).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings

import torch

from sla_dsl.experiments.diagnostics import gate_diagnostics
from sla_dsl.experiments.grid import Run
from sla_dsl.experiments.tasks import task_of
from sla_dsl.nn import LanguageModel, LMConfig

LOG_EVERY = 25  # steps between host syncs for the loss (and the progress bar)
GRAD_CLIP = 1.0


class BudgetExhausted(Exception):
    """The time budget ran out during a run: the run is abandoned, nothing of it is recorded."""


@dataclasses.dataclass
class PooledModel:
    module: LanguageModel
    compiled: torch.nn.Module | None  # None: eager (not asked for, or compiling failed: see compile_error)
    compile_error: str | None = None


class ModelPool:
    def __init__(self, specs: dict, device: torch.device, backend: str, compile_models: bool):
        self.specs, self.device, self.backend, self.compile_models = specs, device, backend, compile_models
        self.models: dict[tuple, PooledModel] = {}

    def fresh(self, run: Run) -> PooledModel:
        torch.manual_seed(run.seed)
        model = LanguageModel(LMConfig(spec=self.specs[run.spec].source_path, vocab_size=run.vocab_size,
                                       hidden_size=run.width, num_layers=run.layers, num_heads=run.heads,
                                       use_short_conv=True, backend=self.backend))
        pooled = self.models.get(run.model_key())
        if pooled is None:
            model.to(self.device)
            pooled = PooledModel(model, torch.compile(model) if self.compile_models else None)
            self.models[run.model_key()] = pooled
        else:
            pooled.module.load_state_dict(model.state_dict())
        return pooled


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def make_optimizer(model: torch.nn.Module, run: Run, device: torch.device):
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields the tied embedding once
        wants_decay = param.dim() >= 2 and not getattr(param, "_no_weight_decay", False)
        (decay if wants_decay else no_decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": run.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=run.lr, betas=(0.9, 0.98),
                                  fused=device.type == "cuda")
    warmup = max(1, int(run.warmup_fraction * run.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, run.steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train_step(pooled: PooledModel, batch, device: torch.device) -> torch.Tensor:
    """Forward and backward; if the compiled model fails (at its first call or a recompile), warn once and go
    on eager for this model: a long grid must not die on a compiler problem that eager mode does not have."""
    if pooled.compiled is not None:
        try:
            with autocast(device):
                loss = pooled.compiled(batch.inputs, labels=batch.labels, labelled_logits_only=True).loss
            loss.backward()
            return loss.detach()
        except Exception as exc:  # noqa: BLE001 -- reported, recorded with the run, and eager mode takes over
            pooled.compile_error = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            pooled.compiled = None
            warnings.warn(f"torch.compile failed for this model; continuing eager: {pooled.compile_error}",
                          stacklevel=2)
            pooled.module.zero_grad(set_to_none=True)
    with autocast(device):
        loss = pooled.module(batch.inputs, labels=batch.labels, labelled_logits_only=True).loss
    loss.backward()
    return loss.detach()


def train_and_evaluate(run: Run, pool: ModelPool, deadline: float = math.inf, progress=None) -> dict:
    """Trains `run` and returns its measurements (accuracy, loss, task metrics, gates, timing). Raises
    `BudgetExhausted` when time.monotonic() passes `deadline` during training. `progress(total)` may return a
    progress bar (update(n), set_postfix_str(s), close())."""
    device = pool.device
    started = time.monotonic()
    task = task_of(run)
    pooled = pool.fresh(run)
    model = pooled.module
    model.train()
    optimizer, schedule = make_optimizer(model, run, device)
    generator = torch.Generator(device).manual_seed(run.seed)
    bar = progress(run.steps) if progress is not None else None
    recent: list[torch.Tensor] = []
    train_losses: list[float] = []
    diverged = False
    first_step_s = None
    try:
        for step in range(run.steps):
            if time.monotonic() > deadline:
                raise BudgetExhausted(f"budget ran out at step {step} of {run.steps}: {run.label()}")
            loss = _train_step(pooled, task.train_batch(step, generator), device)
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            recent.append(loss)
            if first_step_s is None:
                first_step_s = time.monotonic() - started  # includes building kernels and compiling
            if (step + 1) % LOG_EVERY == 0 or step + 1 == run.steps:
                mean = float(torch.stack(recent).float().mean())
                train_losses.append(mean)
                if bar is not None:
                    bar.update(len(recent))
                    bar.set_postfix_str(f"loss {mean:.3f}")
                recent = []
                if not math.isfinite(mean):
                    diverged = True
                    break
    finally:
        if bar is not None:
            bar.close()
    steps_done = step + 1
    trained = time.monotonic()

    model.eval()
    with torch.no_grad(), autocast(device):
        metrics = task.evaluate(lambda inputs: model(inputs).logits, device)
        gates = gate_diagnostics(model, task.probe_inputs(device))
    finished = time.monotonic()
    tail = train_losses[-max(1, len(train_losses) // 10):]  # the last tenth of training
    return {
        "accuracy": metrics.pop("accuracy"),
        "loss": _finite_or_none(metrics.pop("loss")),
        "train_loss": _finite_or_none(sum(tail) / len(tail)),
        "diverged": diverged,
        "steps_done": steps_done,
        "metrics": metrics,
        "gates": gates,
        "parameters": model.num_parameters(),
        "compiled": pooled.compiled is not None,
        "compile_error": pooled.compile_error,
        "timing": {"wall_s": round(finished - started, 3), "train_s": round(trained - started, 3),
                   "eval_s": round(finished - trained, 3), "first_step_s": round(first_step_s, 3),
                   "steps_per_s": round(steps_done / max(trained - started, 1e-9), 2)},
    }


def _finite_or_none(value):
    return value if value is not None and math.isfinite(value) else None
