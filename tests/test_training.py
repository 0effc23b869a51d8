"""Training: the corpus and its batches, loss going down, exact resume from a checkpoint, DDP over two gloo
processes (gradients and losses equal one process on the combined batch), and the benchmark driver."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sla_dsl import distributed
from sla_dsl.batches import TrainBatches, eval_windows
from sla_dsl.corpus import DOCUMENT_SEPARATOR, ByteTokenizer, CorpusError, is_held_out, load_corpus, source_files
from sla_dsl.train import TrainConfig, build_model, forward_backward, train, wrap_for_training

REPO = Path(__file__).resolve().parent.parent
# A tiny model on the reference backend: every run here takes seconds on two CPU cores.
TINY = TrainConfig(spec=str(REPO / "specs" / "sla_gdn.yaml"), backend="reference", batch_size=4, seq_len=32,
                   hidden_size=16, num_layers=1, num_heads=2, lr=1e-2, eval_every=1000, eval_tokens=512,
                   compile=False, progress=False, device="cpu")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_corpus_is_the_stdlib_source_split_by_file(corpus):
    files = source_files(corpus.root)
    assert files == sorted(files) and "os.py" in files and not any(f.startswith("test/") for f in files)
    held_out = [f for f in files if is_held_out(f)]
    assert corpus.eval_files == len(held_out) > 0 and corpus.train_files == len(files) - len(held_out)
    assert int((corpus.eval == DOCUMENT_SEPARATOR).sum()) == corpus.eval_files  # one separator per file
    first_eval = (corpus.root / held_out[0]).read_bytes()
    assert bytes(corpus.eval[:len(first_eval)].tolist()) == first_eval
    assert corpus.train.numel() > 10 * corpus.eval.numel()
    assert ByteTokenizer.decode(ByteTokenizer.encode("déjà vu\n")) == "déjà vu\n"


def test_corpus_missing_or_stripped_fails_clearly(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "nowhere")
    (tmp_path / "only.py").write_text("x = 1\n")
    with pytest.raises(CorpusError, match=r"1 \.py files .*standard library's sources"):
        load_corpus(tmp_path)


def test_batches_are_a_function_of_step_and_split_over_ranks(corpus):
    one = TrainBatches(corpus.train, 16, 6, seed=3)
    ranks = [TrainBatches(corpus.train, 16, 3, rank=r, world_size=2, seed=3) for r in range(2)]
    for step in (0, 5, one.windows_per_epoch // 6 + 1):  # the last one is in the second epoch
        inputs, labels = one.get(step)
        assert torch.equal(torch.cat([r.get(step)[0] for r in ranks]), inputs)
        assert torch.equal(inputs[:, 1:], labels[:, :-1])
    assert not torch.equal(one.get(0)[0], one.get(1)[0])
    assert torch.equal(TrainBatches(corpus.train, 16, 6, seed=3).get(7)[0], one.get(7)[0])
    epoch = one.windows_per_epoch
    first = torch.cat([one.starts(s) for s in range(epoch // 6)])
    assert first.unique().numel() == first.numel()  # no window twice within an epoch
    starts = eval_windows(corpus.eval, 32, 4096)
    assert starts.numel() == 128 and int(starts[-1]) + 33 <= corpus.eval.numel()


def test_training_reduces_the_loss():
    log = train(dataclasses.replace(TINY, steps=25, eval_every=25, warmup_steps=2))
    losses = [e["loss"] for e in log["train"]]
    assert len(losses) == 25 and losses[0] > 5.0  # about log(256) = 5.55 at the start
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    assert log["eval"][-1]["loss"] < losses[0] - 1.0
    assert log["summary"]["timed_steps"] == 23 and log["summary"]["tokens_per_s"] > 0


def test_resume_from_a_checkpoint_gives_the_uninterrupted_losses(tmp_path):
    """Compiled (inductor, fullgraph): the checkpoint at step 3 resumes to the same losses at steps 4-6."""
    cfg = dataclasses.replace(TINY, steps=6, compile=True, eval_every=3, checkpoint_dir=str(tmp_path / "ck"),
                              log_json=str(tmp_path / "run.json"))
    whole = train(cfg)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000003.pt", "step-00000006.pt"]
    resumed = train(dataclasses.replace(cfg, checkpoint_dir=None, log_json=None,
                                        resume=str(tmp_path / "ck" / "step-00000003.pt")))
    assert [e["loss"] for e in resumed["train"]] == [e["loss"] for e in whole["train"]]
    # Inductor may compile the no-grad eval graph afresh after a resume (other dynamic-shape guards), which
    # reorders its float sums: eval losses agree to rounding, not bit for bit; the train losses above do.
    assert [e["step"] for e in resumed["eval"]] == [e["step"] for e in whole["eval"]]
    assert [e["loss"] for e in resumed["eval"]] == pytest.approx([e["loss"] for e in whole["eval"]], rel=1e-6)
    assert json.loads((tmp_path / "run.json").read_text())["summary"]["steps"] == 6

    with pytest.raises(ValueError, match="resume: the checkpoint is of another run .*seq_len"):
        train(dataclasses.replace(cfg, seq_len=16, resume=str(tmp_path / "ck"), compile=False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on the two cores of CI: more threads would only contend
    group = distributed.setup("cpu")
    model = build_model(TINY, group.device)
    forward = wrap_for_training(model, TINY, group)
    batches = TrainBatches(load_corpus().train, TINY.seq_len, TINY.batch_size, rank=rank, world_size=world_size)
    forward_backward(forward, *batches.get(0))
    torch.save({name: p.grad for name, p in model.named_parameters()}, Path(out) / f"grads{rank}.pt")
    # The entry point itself, in the same process group (it leaves it at the end).
    train(dataclasses.replace(TINY, steps=3, eval_every=3, log_json=str(Path(out) / f"log{rank}.json")))


def test_two_gloo_processes_equal_one_process_on_the_combined_batch(tmp_path):
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")

    single = dataclasses.replace(TINY, batch_size=2 * TINY.batch_size)
    model = build_model(single, torch.device("cpu"))
    corpus = load_corpus()
    forward_backward(model, *TrainBatches(corpus.train, single.seq_len, single.batch_size).get(0))
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)

    log = train(dataclasses.replace(single, steps=3, eval_every=3))
    ddp_log = json.loads((tmp_path / "log0.json").read_text())
    assert ddp_log["world_size"] == 2 and ddp_log["summary"]["tokens"] == log["summary"]["tokens"]
    for ours, theirs in zip(ddp_log["train"], log["train"]):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert ddp_log["eval"][-1]["loss"] == pytest.approx(log["eval"][-1]["loss"], rel=1e-5)


def test_train_bench_keeps_going_past_a_failing_spec(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\ndecay: sideways\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sla_dsl", "train-bench", "--specs", "gla", str(broken), "sla_gla",
               "--device", "cpu", "--backend", "reference", "--no-compile", "--hidden-size", "16", "--num-layers",
               "1", "--num-heads", "2", "--batch-size", "2", "--seq-len", "32", "--token-budget", "192",
               "--eval-every", "2", "--eval-tokens", "64", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr  # one spec failed
    results = json.loads((out / "results.json").read_text())
    runs = {r["spec"]: r for r in results["runs"]}
    assert [r["status"] for r in results["runs"]] == ["ok", "failed", "ok"]
    assert "decay" in runs["broken"]["error"]
    for name in ("gla", "sla_gla"):
        assert runs[name]["steps"] == 3 and runs[name]["tokens"] == 192
        assert runs[name]["final_eval_loss"] > 0 and len(runs[name]["train_curve"]) == 3
    table = (out / "results.md").read_text()
    assert "| sla_gla | ok |" in table and "| broken | failed |" in table
    assert (out / "loss_curves.png").stat().st_size > 0 and "===== sla_gla" in (out / "train-bench.log").read_text()
    assert "| gla | ok |" in done.stdout  # the closing table
