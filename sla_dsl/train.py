"""`python -m sla_dsl train`: trains a `LanguageModel` of one spec on the standard-library corpus.

    python -m sla_dsl train --spec specs/sla_gla.yaml --steps 1000 --batch-size 16 --seq-len 512
    torchrun --nproc_per_node 8 -m sla_dsl train --spec specs/sla_gla.yaml ...     # DDP, one GPU per rank

The model runs under `torch.compile(fullgraph=True)` (the spec's op is a registered torch op, so the whole
forward and backward is one graph), AdamW (no weight decay on vectors, norms and the GDN decay parameters),
linear warm-up then cosine decay to a tenth of --lr, gradient clipping, bf16 autocast on the GPU (fp32 on the
CPU). Under torchrun each rank reads its own part of each global batch (`sla_dsl.batches`): the global batch
is --batch-size x ranks, and the losses and gradients are those of one process on the global batch.

Evaluation (every --eval-every steps and at the end) runs the eager model under no_grad on --eval-tokens
held-out tokens, each rank a share: a second compiled graph for no_grad would cost another compile for a
small share of the work. Checkpoints (model, optimizer, step, RNG states, what decides the batches, the
logged history) go to --checkpoint-dir every --checkpoint-every steps and at the end; --resume continues
from one (a file or the newest in a directory) so that the next losses equal an uninterrupted run's.

Throughput: tokens/s counts the steps after the first WARMUP_STEPS of this process (the compile) and leaves
out evaluation and checkpoint time. --log-json writes the per-step loss, evaluations and that summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

WARMUP_STEPS = 2  # steps of each process left out of tokens/s: the first compiles, the second settles
LOSS_WINDOW = 10  # the final train loss is the mean of this many last steps


@dataclasses.dataclass
class TrainConfig:
    spec: str = "specs/sla_gla.yaml"
    backend: str = "auto"
    steps: int | None = None  # None: from token_budget, else DEFAULT_STEPS
    token_budget: int | None = None
    batch_size: int = 16  # sequences per rank and step
    seq_len: int = 512
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int | None = None  # None: the spec's
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int | None = None  # None: a tenth of the steps, at most 100
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_tokens: int = 65536
    log_every: int = 10
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None  # None: eval_every
    keep_checkpoints: int = 2
    resume: str | None = None
    device: str | None = None  # None: cuda when there is one
    seed: int = 0
    compile: bool = True
    log_json: str | None = None
    progress: bool = True


DEFAULT_STEPS = 1000


POSITIVE_FIELDS = ("batch_size", "seq_len", "hidden_size", "num_layers", "num_heads", "eval_every", "eval_tokens",
                   "log_every", "checkpoint_every", "keep_checkpoints", "token_budget")


def check_config(cfg: TrainConfig) -> None:
    """Raises ValueError naming the first option out of range."""
    for name in POSITIVE_FIELDS:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise ValueError(f"--warmup-steps: expected 0 or more, got {cfg.warmup_steps}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr: expected a positive number, got {cfg.lr}")


def total_steps(cfg: TrainConfig, world_size: int) -> int:
    if cfg.steps is not None and cfg.token_budget is not None:
        raise ValueError("--steps, --token-budget: expected one of them, got both")
    if cfg.token_budget is not None:
        return max(1, math.ceil(cfg.token_budget / (cfg.batch_size * cfg.seq_len * world_size)))
    steps = cfg.steps if cfg.steps is not None else DEFAULT_STEPS
    if steps < 1:
        raise ValueError(f"--steps: expected a positive integer, got {steps}")
    return steps


def learning_rate(cfg: TrainConfig, step: int, steps: int) -> float:
    """Linear warm-up over the first warmup steps, then cosine decay to lr / 10 at the last step."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(100, steps // 10)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def model_config(cfg: TrainConfig):
    from sla_dsl.corpus import VOCAB_SIZE
    from sla_dsl.nn import LMConfig

    return LMConfig(spec=cfg.spec, vocab_size=VOCAB_SIZE, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                    num_heads=cfg.num_heads, backend=cfg.backend)


def build_model(cfg: TrainConfig, device: torch.device):
    """The model, initialised from cfg.seed (the same on every rank)."""
    from sla_dsl.nn import LanguageModel

    torch.manual_seed(cfg.seed)
    return LanguageModel(model_config(cfg)).to(device)


def build_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decayed, plain = [], []
    for p in model.parameters():
        (decayed if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) else plain).append(p)
    groups = [{"params": decayed, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def wrap_for_training(model, cfg: TrainConfig, group):
    """The callable a step runs: the model compiled whole (fullgraph), inside DDP when there are several
    ranks (DDP averages the gradients in its hooks after the compiled backward)."""
    forward = torch.compile(model, fullgraph=True) if cfg.compile else model
    if group.active:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(forward, device_ids=[group.device.index] if group.device.type == "cuda"
                                          else None)
    return forward


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_backward(forward, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of one batch, gradients accumulated into the parameters; returns the detached loss."""
    with autocast(inputs.device):
        loss = forward(inputs, labels=labels).loss
    loss.backward()
    return loss.detach()


def evaluate(model, tokens: torch.Tensor, starts: torch.Tensor, cfg: TrainConfig, group) -> float:
    """Mean loss over the windows at `starts` (this rank's share), summed over ranks."""
    from sla_dsl.batches import windows_at

    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=group.device)
    count = torch.zeros((), dtype=torch.float64, device=group.device)
    with torch.no_grad(), autocast(group.device):
        for chunk in starts.split(cfg.batch_size):
            inputs, labels = (t.to(group.device) for t in windows_at(tokens, chunk, cfg.seq_len))
            loss_sum += model(inputs, labels=labels).loss.double() * labels.numel()
            count += labels.numel()
    model.train(was_training)
    total = group.sum(torch.stack([loss_sum, count]))
    return (total[0] / total[1]).item()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _check_resumable(checkpoint: dict, expected: dict) -> None:
    """A checkpoint continues only the run it came from: same model, spec text and batches."""
    differences = [f"{key}: checkpoint {checkpoint.get(key)!r}, now {value!r}"
                   for key, value in expected.items() if checkpoint.get(key) != value]
    if differences:
        raise ValueError("resume: the checkpoint is of another run (" + "; ".join(differences) + ")")


class _Throughput:
    """Train-only wall time from the end of the warm-up steps, pausing for evaluation and checkpoints."""

    def __init__(self, device: torch.device):
        self.device = device
        self.started: float | None = None
        self.paused_s = 0.0
        self.steps = 0

    def start(self) -> None:
        _synchronize(self.device)
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        _synchronize(self.device)
        begin = time.perf_counter()
        yield
        self.paused_s += time.perf_counter() - begin

    def seconds(self) -> float | None:
        if self.started is None:
            return None
        _synchronize(self.device)
        return time.perf_counter() - self.started - self.paused_s


def train(cfg: TrainConfig) -> dict:
    """Runs the training and returns the log (also written to cfg.log_json): config, model, corpus, device,
    `train` [{step, loss, lr, tokens}], `eval` [{step, loss, tokens}], `summary`."""
    from tqdm import tqdm

    from sla_dsl import distributed
    from sla_dsl.autotune.table import versions, write_atomically
    from sla_dsl.batches import TrainBatches, eval_windows
    from sla_dsl.checkpoint import load_checkpoint, save_checkpoint
    from sla_dsl.corpus import load_corpus

    started = time.perf_counter()
    check_config(cfg)
    group = distributed.setup(cfg.device)
    try:
        device = group.device
        steps = total_steps(cfg, group.world_size)
        corpus = load_corpus()
        model = build_model(cfg, device)
        optimizer = build_optimizer(model, cfg, device)
        batches = TrainBatches(corpus.train, cfg.seq_len, cfg.batch_size, rank=group.rank,
                               world_size=group.world_size, seed=cfg.seed)
        eval_starts = eval_windows(corpus.eval, cfg.seq_len, cfg.eval_tokens)[group.rank::group.world_size]
        identity = {"model_config": model_config(cfg).to_dict(), "spec_sha256": model.spec.source_sha256,
                    "data": batches.state_dict()}
        history = {"train": [], "eval": []}
        step = 0
        if cfg.resume:
            checkpoint = load_checkpoint(cfg.resume)
            _check_resumable(checkpoint, identity)
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            step = checkpoint["step"]
            history = checkpoint["history"]
            _restore_rng(checkpoint["rng"], device)
        forward = wrap_for_training(model, cfg, group)
        tokens_per_step = batches.global_batch * cfg.seq_len
        log = {"config": dataclasses.asdict(cfg), "steps": steps, "world_size": group.world_size,
               "model": {"parameters": model.num_parameters(), **identity["model_config"]},
               "corpus": corpus.describe(), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "versions": versions(), "train": history["train"], "eval": history["eval"]}

        checkpoint_every = cfg.checkpoint_every or cfg.eval_every
        first_step = step
        throughput = _Throughput(device)
        pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, loss on the device): read back at flush
        bar = tqdm(total=steps, initial=step, desc=model.spec.name, unit="step", dynamic_ncols=True,
                   disable=not (group.is_main and cfg.progress))
        since = [time.perf_counter(), step]  # the progress bar's tokens/s: since the last read-back

        def flush() -> None:
            losses = group.mean(torch.stack([loss for _, _, loss in pending])).tolist()
            for (done, lr, _), loss in zip(pending, losses):
                history["train"].append({"step": done, "loss": loss, "lr": lr, "tokens": done * tokens_per_step})
            pending.clear()
            now = time.perf_counter()
            rate = (history["train"][-1]["step"] - since[1]) * tokens_per_step / max(now - since[0], 1e-9)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{rate:,.0f}",
                            eval=f"{history['eval'][-1]['loss']:.4f}" if history["eval"] else "-")

        def write_log() -> None:
            if group.is_main and cfg.log_json:
                write_atomically(Path(cfg.log_json), json.dumps(log, indent=1) + "\n")

        def run_eval(done: int) -> None:
            loss = evaluate(model, corpus.eval, eval_starts, cfg, group)
            history["eval"].append({"step": done, "loss": loss, "tokens": done * tokens_per_step})
            if group.is_main:
                bar.write(f"{model.spec.name} step {done}/{steps}: train loss {history['train'][-1]['loss']:.4f}, "
                          f"eval loss {loss:.4f}")

        def save(done: int) -> None:
            if group.is_main:
                save_checkpoint(cfg.checkpoint_dir, done, {
                    **identity, "step": done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "rng": _rng_state(device), "history": history}, keep=cfg.keep_checkpoints)
            group.barrier()

        model.train()
        while step < steps:
            if step == first_step + WARMUP_STEPS:
                throughput.start()
            lr = learning_rate(cfg, step, steps)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            inputs, labels = (t.to(device, non_blocking=True) for t in batches.get(step))
            loss = forward_backward(forward, inputs, labels)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            throughput.steps += step > first_step + WARMUP_STEPS
            pending.append((step, lr, loss))
            bar.update(1)
            evaluating = step % cfg.eval_every == 0 or step == steps
            saving = cfg.checkpoint_dir is not None and (step % checkpoint_every == 0 or step == steps)
            if step % cfg.log_every == 0 or evaluating or saving:
                with throughput.paused():
                    flush()
                    if evaluating:
                        run_eval(step)
                    if saving:
                        save(step)
                    write_log()
                since[:] = [time.perf_counter(), step]
        bar.close()

        seconds = throughput.seconds()
        last = [entry["loss"] for entry in history["train"][-LOSS_WINDOW:]]
        log["summary"] = {
            "steps": step, "tokens": step * tokens_per_step, "tokens_per_step": tokens_per_step,
            "final_train_loss": sum(last) / len(last) if last else None,
            "final_eval_loss": history["eval"][-1]["loss"] if history["eval"] else None,
            "tokens_per_s": throughput.steps * tokens_per_step / seconds if seconds else None,
            "timed_steps": throughput.steps, "wall_s": time.perf_counter() - started}
        write_log()
        return log
    finally:
        distributed.teardown(group)


# -- command line ------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    import argparse

    defaults = TrainConfig()
    add = parser.add_argument
    add("--spec", default=defaults.spec, help="spec file (default %(default)s)")
    add("--backend", default=defaults.backend, help="auto (triton on CUDA, reference on CPU) | reference | triton "
        "| tilelang")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {DEFAULT_STEPS})")
    budget.add_argument("--token-budget", type=int, default=None,
                        help="train tokens in all: steps = budget / (batch size x seq len x ranks), rounded up")
    add("--batch-size", type=int, default=defaults.batch_size, help="sequences per rank and step")
    add("--seq-len", type=int, default=defaults.seq_len)
    add("--hidden-size", type=int, default=defaults.hidden_size)
    add("--num-layers", type=int, default=defaults.num_layers)
    add("--num-heads", type=int, default=None, help="default: the spec's layer.num_heads")
    add("--lr", type=float, default=defaults.lr, help="peak learning rate")
    add("--weight-decay", type=float, default=defaults.weight_decay)
    add("--warmup-steps", type=int, default=None, help="default: a tenth of the steps, at most 100")
    add("--grad-clip", type=float, default=defaults.grad_clip, help="max gradient norm (0: off)")
    add("--eval-every", type=int, default=defaults.eval_every)
    add("--eval-tokens", type=int, default=defaults.eval_tokens, help="held-out tokens per evaluation")
    add("--log-every", type=int, default=defaults.log_every, help="steps between loss read-backs")
    add("--checkpoint-dir", default=None)
    add("--checkpoint-every", type=int, default=None, help="default: --eval-every")
    add("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
    add("--resume", default=None, help="checkpoint file, or a directory (its newest checkpoint)")
    add("--device", default=None, help="cuda | cpu (default: cuda when there is one)")
    add("--seed", type=int, default=defaults.seed)
    add("--compile", action=argparse.BooleanOptionalAction, default=True,
        help="torch.compile(fullgraph=True) the model (default on)")
    add("--log-json", default=None, help="write per-step losses, evaluations and the summary here")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")


def config_from_args(args) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def run_train(args) -> int:
    from sla_dsl.corpus import CorpusError
    from sla_dsl.loader import SpecError

    try:
        log = train(config_from_args(args))
    except SpecError as exc:  # one `file:line: field: message` line per problem, as `check` prints them
        print("\n".join(str(problem) for problem in exc.problems))
        return 2
    except (CorpusError, FileNotFoundError, ValueError) as exc:
        print(f"train: {exc}")
        return 2
    summary = log["summary"]
    rate = summary["tokens_per_s"]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {summary['steps']} steps ({summary['tokens']:,} tokens) in {summary['wall_s']:.1f} s: "
              f"final train loss {summary['final_train_loss']:.4f}, eval loss {summary['final_eval_loss']:.4f}, "
              + (f"{rate:,.0f} tokens/s" if rate else "tokens/s not measured (too few steps)"))
    return 0
