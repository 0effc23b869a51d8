"""Issue 7's experiment code: task generators, grid, runner (resume, budget), gate diagnostics, report."""

import json
import math
import time

import pytest
import torch

from sla_dsl.cli import main
from sla_dsl.experiments import results
from sla_dsl.experiments.diagnostics import entropy_fraction, failure_signs, gate_diagnostics
from sla_dsl.experiments.grid import GPU_SMALL_MQAR_BUDGET, SEED_SPECS, Run, expand, sub_grids
from sla_dsl.experiments.mqar import IGNORE, MQAR
from sla_dsl.experiments.niah import NeedleInHaystack
from sla_dsl.experiments.protocol import best_lr_runs, later_seed_count, missing_sweep_runs, sweep_runs
from sla_dsl.experiments.report import select_cells, write_report
from sla_dsl.experiments.runner import run_grid
from sla_dsl.experiments.tasks import score
from sla_dsl.experiments.training import (BudgetExhausted, ModelPool, PooledModel, _train_step, make_optimizer,
                                          train_and_evaluate)
from sla_dsl.loader import load_spec
from sla_dsl.nn import LanguageModel, LMConfig

SPECS = {name: load_spec(f"specs/{name}.yaml") for name in ("gla", "sla_gla")}
CPU = torch.device("cpu")


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# MQAR

def test_mqar_queries_are_answered_by_the_values_bound_at_the_start():
    task = MQAR(seq_len=128, num_kv_pairs=16, vocab_size=512)
    batch = task.sample(32, generator())
    n = task.num_kv_pairs
    for inputs, labels in zip(batch.inputs.tolist(), batch.labels.tolist()):
        bound = dict(zip(inputs[0:2 * n:2], inputs[1:2 * n:2]))
        assert len(bound) == n and len(set(bound.values())) == n  # distinct keys and values
        queries = [t for t, label in enumerate(labels) if label != IGNORE]
        assert len(queries) == n  # the loss mask covers exactly the queries
        assert sorted(inputs[t] for t in queries) == sorted(bound)  # every key queried once
        for t in queries:
            assert t >= 2 * n and (t - 2 * n) % 2 == 0
            assert labels[t] == bound[inputs[t]]


def test_mqar_key_and_value_ranges_are_disjoint_halves_of_the_vocabulary():
    task = MQAR(seq_len=64, num_kv_pairs=8, vocab_size=1024)
    assert set(task.keys).isdisjoint(task.values)
    assert max(task.values) == 1023 and task.values.start == 512
    batch = task.sample(64, generator(1))
    assert all(k in task.keys for k in batch.inputs[:, 0:16:2].flatten().tolist())
    assert all(v in task.values for v in batch.inputs[:, 1:16:2].flatten().tolist())
    labelled = batch.labels[batch.labels != IGNORE]
    assert all(v in task.values for v in labelled.tolist())


def test_mqar_gaps_follow_the_power_law():
    task = MQAR(seq_len=64, num_kv_pairs=1, vocab_size=256, power_a=0.01)
    p = task.gap_probabilities()
    ranks = torch.arange(1, task.num_gaps + 1, dtype=torch.float64)
    assert torch.allclose(p.double() / p[0].double(), ranks ** (0.01 - 1), rtol=1e-5)  # P(g) ~ (g+1)^(a-1)
    batch = task.sample(40000, generator(2))
    positions = (batch.labels != IGNORE).nonzero()[:, 1]
    gaps = (positions - 2) // 2
    observed = torch.bincount(gaps, minlength=task.num_gaps).double() / gaps.numel()
    assert (observed - p.double()).abs().max() < 0.01
    assert observed[0] > 5 * observed[-5:].mean()  # most queries come soon after the pairs


def test_mqar_same_seed_same_batch_and_bad_configs_raise():
    task = MQAR(seq_len=64, num_kv_pairs=8)
    a, b = task.sample(4, generator(3)), task.sample(4, generator(3))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        MQAR(seq_len=64, num_kv_pairs=17)
    with pytest.raises(ValueError, match="seq_len"):
        MQAR(seq_len=63, num_kv_pairs=4)


def causal_lookup_logits(inputs: torch.Tensor, num_kv_pairs: int, vocab_size: int, shift: int = 0):
    """Logits of a perfect MQAR solver that reads only inputs[:, :t + 1] to predict at t (with `shift`, the
    prediction meant for t - shift sits at t): the value bound to the key inputs[:, t], if that key is bound."""
    batch, length = inputs.shape
    logits = torch.zeros(batch, length, vocab_size)
    for b in range(batch):
        bound = {}
        for t in range(length):
            if t < 2 * num_kv_pairs and t % 2 == 1:
                bound[int(inputs[b, t - 1])] = int(inputs[b, t])  # the pair (t-1, t) is complete at t
            value = bound.get(int(inputs[b, t]))
            if value is not None and t >= 2 * num_kv_pairs and t + shift < length:
                logits[b, t + shift, value] = 1.0
    return logits


def test_mqar_labels_and_scoring_line_up_with_a_causal_solver_and_the_model_loss():
    """The target at an answer position t is predicted from inputs[:, :t + 1] (no shift by the model or the
    scorer): a causal lookup scores 1.0, the same lookup off by one position in either direction ~0, and the
    model's loss is the cross entropy of its logits at exactly the labelled positions."""
    task = MQAR(seq_len=64, num_kv_pairs=8, vocab_size=256)
    batch = task.sample(16, generator(5))
    for shift, expected in ((0, 1.0), (1, 0.0), (-1, 0.0)):
        correct, labelled, _ = score(causal_lookup_logits(batch.inputs, 8, 256, shift), batch.labels)
        assert int(labelled.sum()) == 16 * 8  # every query, nothing else
        assert float(correct.sum() / labelled.sum()) == pytest.approx(expected, abs=0.02), shift
    torch.manual_seed(0)
    model = LanguageModel(LMConfig(spec="specs/gla.yaml", vocab_size=256, hidden_size=32, num_layers=1,
                                   num_heads=4, backend="reference"))
    out = model(batch.inputs, labels=batch.labels)
    mask = batch.labels != IGNORE
    expected = torch.nn.functional.cross_entropy(out.logits[mask], batch.labels[mask])
    assert torch.allclose(out.loss, expected)
    _, _, summed = score(out.logits.detach(), batch.labels)
    assert float(summed) / int(mask.sum()) == pytest.approx(out.loss.item(), rel=1e-5)


def test_learning_rate_schedule_and_weight_decay_groups():
    run = Run(task="mqar", spec="gla", width=16, heads=2, layers=1, lr=1e-2, seed=0, steps=100, batch_size=2,
              vocab_size=64, eval_examples=2, seq_len=16, kv_pairs=2, weight_decay=0.1, warmup_fraction=0.1)
    model = LanguageModel(LMConfig(spec="specs/gla.yaml", vocab_size=64, hidden_size=16, num_layers=1,
                                   num_heads=2, backend="reference"))
    optimizer, schedule = make_optimizer(model, run, CPU)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert not any(p.dim() < 2 for p in decayed["params"])  # norms and biases are not decayed
    assert {id(p) for p in decayed["params"] + plain["params"]} == {id(p) for p in model.parameters()}
    lrs = []
    for _ in range(run.steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)  # linear warm-up over 10 steps
    assert max(lrs) == pytest.approx(1e-2) and lrs[-1] < 1e-4  # then cosine decay to ~0
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_gpu_small_mqar_trains_long_enough_and_fits_its_budget():
    """The first gpu-small (400 steps x batch 64 = 25,600 sequences a run, 30 runs) learned nothing in any run
    on the H100; a run must see far more sequences, and the preset still has to fit ~8 minutes there."""
    specs = {name: load_spec(f"specs/{name}.yaml") for name in SEED_SPECS}
    runs, skipped = expand(sub_grids("mqar", "gpu-small", {}), {n: s.layer for n, s in specs.items()})
    assert not skipped
    assert {run.spec for run in runs} == set(SEED_SPECS) and {run.seed for run in runs} == {0, 1}
    for run in runs:
        assert run.steps * run.batch_size >= 100_000, run.label()  # Zoology's train set: 100k sequences
        assert run.steps >= 800 and run.lr >= 1e-3
    seconds = sum(run.steps for run in runs) / GPU_SMALL_MQAR_BUDGET["steps_per_s"]
    assert seconds <= GPU_SMALL_MQAR_BUDGET["seconds"]


# ---------------------------------------------------------------------------------------------------------
# Needle in a haystack

@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_sits_at_the_requested_depth_and_is_the_answer(depth):
    task = NeedleInHaystack(vocab_size=512, num_keys=32, value_alphabet=16, value_len=6)
    length, value_len = 100, 6
    context = length - value_len
    batch = task.sample(16, length, generator(4), depth)
    start = round(depth * (context - 1 - value_len))
    assert (batch.needle_start == start).all()
    for inputs, labels in zip(batch.inputs.tolist(), batch.labels.tolist()):
        key, value = inputs[start], inputs[start + 1:start + 1 + value_len]
        assert key in task.keys and all(t in task.value_tokens for t in value)
        assert [t for t, label in enumerate(labels) if label != IGNORE] == list(range(context, length))
        assert labels[context:] == value  # the loss mask covers exactly the answer positions
        assert inputs[context] == key and inputs[context + 1:] == value[:-1]  # question, then teacher forcing
        assert inputs.count(key) == 2  # the needle and the question: the answer is determined
        rest = inputs[:start] + inputs[start + 1 + value_len:context]
        assert all(t in task.haystack_tokens for t in rest)
    if depth == 1.0:
        assert start + value_len == context - 1  # the needle ends right before the question


def test_needle_ranges_are_disjoint_and_bad_arguments_raise():
    task = NeedleInHaystack(vocab_size=512, num_keys=32)
    ranges = [set(task.keys), set(task.value_tokens), set(task.haystack_tokens)]
    assert sum(len(r) for r in ranges) == 512 and len(set.union(*ranges)) == 512
    with pytest.raises(ValueError, match="seq_len"):
        task.sample(2, 2 * task.value_len, generator())
    with pytest.raises(ValueError, match="depth"):
        task.sample(2, 64, generator(), 1.5)


# ---------------------------------------------------------------------------------------------------------
# Gate diagnostics

def test_entropy_fraction_of_hand_built_gates():
    heads = 8
    assert entropy_fraction(torch.full((3, 5, heads), 1 / heads)) == pytest.approx(1.0, abs=1e-12)
    one_hot = torch.nn.functional.one_hot(torch.randint(heads, (3, 5)), heads).float()
    assert entropy_fraction(one_hot) == pytest.approx(0.0, abs=1e-12)
    two_way = torch.zeros(heads)
    two_way[:2] = 0.5
    assert entropy_fraction(two_way) == pytest.approx(math.log(2) / math.log(heads))


def test_gate_diagnostics_of_a_model():
    torch.manual_seed(0)
    model = LanguageModel(LMConfig(spec="specs/sla_gla.yaml", vocab_size=64, hidden_size=32, num_layers=2,
                                   num_heads=4, backend="reference"))
    attn = model.blocks[0].attn
    torch.nn.init.zeros_(attn.gq_proj.weight)  # logits 0 for every input: a uniform read gate
    rows = gate_diagnostics(model, torch.randint(64, (2, 16)))
    assert [row["layer"] for row in rows] == [0, 1]
    assert rows[0]["read_entropy_fraction"] == pytest.approx(1.0) and rows[0]["read_weight_norm"] == 0.0
    assert "G^Q near uniform" in failure_signs(rows[0]) and "G^Q collapsed" in failure_signs(rows[0])
    assert 0 < rows[1]["read_entropy_fraction"] < 1 and rows[1]["write_weight_norm"] > 0
    baseline = LanguageModel(LMConfig(spec="specs/gla.yaml", vocab_size=64, hidden_size=32, num_layers=1,
                                      num_heads=4, backend="reference"))
    assert gate_diagnostics(baseline, torch.randint(64, (2, 16))) == []


# ---------------------------------------------------------------------------------------------------------
# Grid, model pool, runner

def tiny_grid(task="mqar", **changes):
    grid = dict(specs=["gla", "sla_gla"], widths=[16], heads=[2], lrs=[3e-3], seeds=[0], steps=3, batch_size=4,
                layers=1, eval_examples=8)
    if task == "mqar":
        grid.update(seq_lens=[32], kv_pairs=[4])
    else:
        grid.update(train_lens=[40], eval_lens=[40, 64])
    grid.update(changes)
    runs, _ = expand(sub_grids(task, "smoke", grid), {n: s.layer for n, s in SPECS.items()})
    return runs


def test_grid_order_overrides_and_left_out_combinations():
    grids = sub_grids("mqar", "smoke", {"seq_lens": [32], "kv_pairs": [4, 16], "heads": [2, 3], "seeds": [0, 1]})
    runs, skipped = expand(grids, {n: s.layer for n, s in SPECS.items()})
    assert [run.seed for run in runs] == [0, 0, 1, 1]  # seed-major: complete seeds first under a budget
    assert {(run.kv_pairs, run.heads) for run in runs} == {(4, 2)}
    assert any("kv_pairs" in line for line in skipped)  # 16 pairs do not fit in 32 tokens
    assert any("not divisible by 3 heads" in line for line in skipped)
    assert Run.from_dict(json.loads(runs[0].key())) == runs[0]


def test_pool_reuses_the_module_with_fresh_parameters():
    run = tiny_grid()[1]
    pool = ModelPool(SPECS, CPU, "reference", compile_models=False)
    first = pool.fresh(run)
    initial = {k: v.clone() for k, v in first.module.state_dict().items()}
    with torch.no_grad():
        for param in first.module.parameters():
            param.add_(1.0)
    again = pool.fresh(run)
    assert again.module is first.module
    for key, value in again.module.state_dict().items():
        assert torch.equal(value, initial[key]), key


def test_a_failing_compiled_model_falls_back_to_eager():
    run = tiny_grid()[0]
    module = ModelPool(SPECS, CPU, "reference", compile_models=False).fresh(run).module

    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded")
    pooled = PooledModel(module, broken)
    batch = MQAR(run.seq_len, run.kv_pairs, run.vocab_size).sample(2, generator())
    with pytest.warns(UserWarning, match="inductor exploded"):
        loss = _train_step(pooled, batch, CPU)
    assert torch.isfinite(loss) and pooled.compiled is None and "inductor exploded" in pooled.compile_error
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("task", ["mqar", "niah"])
def test_run_grid_writes_results_and_resumes(tmp_path, task):
    out = tmp_path / "results.json"
    runs = tiny_grid(task)
    summary = run_grid(runs, SPECS, out, device=CPU, progress=False, log=lambda line: None)
    assert summary == {"finished": 2, "skipped": 0, "left": 0, "stopped": None}
    records = results.load(out)
    assert [r["config"]["spec"] for r in records] == ["gla", "sla_gla"]
    for record in records:
        assert 0 <= record["accuracy"] <= 1 and record["loss"] > 0 and record["steps_done"] == 3
        assert record["timing"]["wall_s"] > 0 and record["versions"]["torch"] and record["backend"] == "reference"
        assert record["sla"] == (record["config"]["spec"] == "sla_gla")
        assert (len(record["gates"]) == 1) == record["sla"]
    if task == "niah":
        cells = records[0]["metrics"]["cells"]
        assert {(c["length"], c["depth"]) for c in cells} == {(n, d) for n in (40, 64)
                                                              for d in (0.0, 0.25, 0.5, 0.75, 1.0)}
        assert records[0]["metrics"]["extrapolation_accuracy"] is not None
    before = out.read_text()
    again = run_grid(runs, SPECS, out, device=CPU, progress=False, log=lambda line: None)
    assert again == {"finished": 0, "skipped": 2, "left": 0, "stopped": None}
    assert out.read_text() == before  # finished runs are skipped, not redone
    more = run_grid(tiny_grid(task, seeds=[0, 1]), SPECS, out, device=CPU, progress=False, log=lambda line: None)
    assert more["finished"] == 2 and more["skipped"] == 2
    assert sorted((r["config"]["spec"], r["config"]["seed"]) for r in results.load(out)) == \
        [("gla", 0), ("gla", 1), ("sla_gla", 0), ("sla_gla", 1)]


def test_budget_stops_cleanly_and_records_nothing_unfinished(tmp_path):
    out = tmp_path / "results.json"
    summary = run_grid(tiny_grid(), SPECS, out, device=CPU, budget_minutes=1e-9, progress=False,
                       log=lambda line: None)
    assert summary["finished"] == 0 and summary["left"] == 2 and summary["stopped"].startswith("budget")
    assert results.load(out) == []
    pool = ModelPool(SPECS, CPU, "reference", compile_models=False)
    with pytest.raises(BudgetExhausted, match="at step 0 of 3"):  # overtaken during a run: abandoned
        train_and_evaluate(tiny_grid()[0], pool, deadline=time.monotonic())


def test_cli_runs_a_grid_and_writes_a_report(tmp_path, capsys):
    out = tmp_path / "mqar.json"
    assert main(["experiment", "mqar", "--preset", "smoke", "--specs", "gla,sla_gla", "--seq-lens", "32",
                 "--kv-pairs", "4", "--widths", "16", "--heads", "2", "--steps", "2", "--batch-size", "2",
                 "--eval-examples", "4", "--layers", "1", "--out", str(out), "--no-progress"]) == 0
    assert len(results.load(out)) == 2
    assert main(["experiment", "report", "--results", str(out), "--out", str(tmp_path / "report")]) == 0
    assert "| 32 | 4 | 16 | 2 | gla |" in (tmp_path / "report" / "report.md").read_text()
    assert "finished 2 run(s)" in capsys.readouterr().out


def test_cli_workers_share_the_grid_and_the_results_file(tmp_path, capfd):
    out = tmp_path / "mqar.json"
    argv = ["experiment", "mqar", "--preset", "smoke", "--specs", "gla,sla_gla", "--seq-lens", "32",
            "--kv-pairs", "4", "--widths", "16", "--heads", "2", "--seeds", "0,1", "--steps", "2", "--batch-size",
            "2", "--eval-examples", "4", "--layers", "1", "--out", str(out), "--workers", "2", "--device", "cpu"]
    assert main(argv) == 0
    records = results.load(out)
    keys = {Run.from_dict(r["config"]).key() for r in records}
    assert len(records) == len(keys) == 4  # each of the four runs once, from two processes appending in turn
    printed = capfd.readouterr().out
    assert "[worker 0] finished 2 run(s)" in printed and "[worker 1] finished 2 run(s)" in printed
    assert main(argv) == 0 and len(results.load(out)) == 4  # run again: everything is already there


def test_protocol_sweeps_the_first_seed_and_keeps_the_other_seeds_at_the_winner():
    runs = tiny_grid(lrs=[1e-3, 3e-3], seeds=[0, 1, 2])
    sweep = sweep_runs(runs)
    assert sorted((r.spec, r.lr, r.seed) for r in sweep) == [("gla", 1e-3, 0), ("gla", 3e-3, 0),
                                                              ("sla_gla", 1e-3, 0), ("sla_gla", 3e-3, 0)]
    assert later_seed_count(runs) == 4  # two specs x seeds 1 and 2, one learning rate each
    winners = {"gla": 3e-3, "sla_gla": 1e-3}
    records = [{"config": r.to_dict(), "accuracy": 0.9 if winners[r.spec] == r.lr else 0.1} for r in sweep]
    assert missing_sweep_runs(runs, records) == []
    assert sorted((r.spec, r.lr, r.seed) for r in best_lr_runs(runs, records)) == \
        [("gla", 3e-3, 1), ("gla", 3e-3, 2), ("sla_gla", 1e-3, 1), ("sla_gla", 1e-3, 2)]
    partial = [record for record in records if record["config"]["spec"] == "gla"]
    assert {r.spec for r in missing_sweep_runs(runs, partial)} == {"sla_gla"}
    assert {r.spec for r in best_lr_runs(runs, partial)} == {"gla"}  # no sweep recorded, no winner yet


def protocol_argv(out, *extra):
    return ["experiment", "mqar", "--preset", "smoke", "--specs", "gla,sla_gla", "--seq-lens", "32", "--kv-pairs",
            "4", "--widths", "16", "--heads", "2", "--lrs", "1e-3,3e-3", "--steps", "2", "--batch-size", "2",
            "--eval-examples", "4", "--layers", "1", "--out", str(out), "--device", "cpu", "--no-progress", *extra]


def assert_seed_1_only_at_the_reports_pick(records):
    """Seed 0 at both learning rates, seed 1 once per spec at the rate the report selects, each run once."""
    assert len({Run.from_dict(r["config"]).key() for r in records}) == len(records) == 6
    assert sorted((r["config"]["spec"], r["config"]["lr"]) for r in records if r["config"]["seed"] == 0) == \
        [("gla", 1e-3), ("gla", 3e-3), ("sla_gla", 1e-3), ("sla_gla", 3e-3)]
    cells = {cell.spec: cell for cell in select_cells(records)}
    assert sorted((r["config"]["spec"], r["config"]["lr"]) for r in records if r["config"]["seed"] == 1) == \
        [("gla", cells["gla"].lr), ("sla_gla", cells["sla_gla"].lr)]
    assert all([r["config"]["seed"] for r in cell.records] == [0, 1] for cell in cells.values())


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_seeds_at_best_lr_runs_the_sweep_then_the_winners_and_resumes(tmp_path, capfd, workers):
    out = tmp_path / "mqar.json"
    argv = protocol_argv(out, "--seeds", "0,1", "--seeds-at-best-lr", "--workers", str(workers))
    assert main(argv) == 0
    assert_seed_1_only_at_the_reports_pick(results.load(out))
    printed = capfd.readouterr().out
    assert "stage 1: 4 run(s)" in printed and "stage 2: 2 run(s)" in printed
    if workers == 2:
        assert printed.count("[worker 0] finished") == printed.count("[worker 1] finished") == 2  # both stages
        return  # resuming is the same with workers; spawning them again would double this test's time
    before = out.read_text()
    assert main(argv) == 0 and out.read_text() == before  # run again: nothing left in either stage
    printed = capfd.readouterr().out
    assert " 0 to run" in printed and "finished 1 run(s)" not in printed and "finished 2 run(s)" not in printed


def test_cli_seeds_at_best_lr_follows_the_sweep_in_the_file(tmp_path, capsys):
    """Stage 2 is derived from the file's stage-1 runs: made-up accuracies there (GLA best at the higher rate,
    GLA+SLA at the lower one) decide where seed 1 runs, and the dry run lists it once stage 1 is complete."""
    out = tmp_path / "mqar.json"
    staged = protocol_argv(out, "--seeds", "0,1", "--seeds-at-best-lr")
    assert main([*staged, "--dry-run"]) == 0
    assert "stage 2: 2 run(s), the other seeds at each (setting, spec)'s best learning rate, decided once stage 1 " \
        "is complete" in capsys.readouterr().out
    assert main(protocol_argv(out, "--seeds", "0")) == 0  # stage 1 by hand
    records = results.load(out)
    winners = {"gla": 3e-3, "sla_gla": 1e-3}
    for record in records:
        record["accuracy"] = 0.9 if winners[record["config"]["spec"]] == record["config"]["lr"] else 0.1
    out.write_text(json.dumps({"runs": records}))
    capsys.readouterr()
    assert main([*staged, "--dry-run"]) == 0
    listed = capsys.readouterr().out.split("2 run(s) in stage 2")[0].split("best learning rate in")[1]
    assert "gla T=32 kv=4 d=16 H=2 lr=0.003 seed=1" in listed and "sla_gla T=32 kv=4 d=16 H=2 lr=0.001 seed=1" in listed
    assert main(staged) == 0
    records = results.load(out)
    assert_seed_1_only_at_the_reports_pick(records)
    assert sorted((r["config"]["spec"], r["config"]["lr"]) for r in records if r["config"]["seed"] == 1) == \
        sorted(winners.items())


def test_cli_seeds_at_best_lr_waits_for_a_complete_sweep(tmp_path, capsys):
    out = tmp_path / "mqar.json"
    argv = protocol_argv(out, "--seeds", "0,1", "--seeds-at-best-lr", "--budget-minutes", "1e-9")
    assert main(argv) == 0
    assert results.load(out) == []
    assert "stage 2 not started: 4 stage-1 run(s) are not in" in capsys.readouterr().out


def test_cli_rejects_a_worker_count_below_one(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "mqar", "--preset", "smoke", "--workers", "0"])
    assert "--workers: expected a positive integer, got '0'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Report

def synthetic_record(spec, lr, seed, acc, kv=16, task="mqar", cells=None, heads=8):
    config = Run(task=task, spec=spec, width=128, heads=heads, layers=2, lr=lr, seed=seed, steps=100,
                 batch_size=64, vocab_size=8192, eval_examples=100,
                 seq_len=256 if task == "mqar" else None, kv_pairs=kv if task == "mqar" else None,
                 train_lens=(1024,) if task == "niah" else None,
                 eval_lens=(1024, 4096) if task == "niah" else None).to_dict()
    sla = spec.startswith("sla_")
    gates = [{"layer": 0, "heads": heads, "read_entropy_fraction": 0.95, "write_entropy_fraction": 0.4,
              "read_weight_norm": 1.5, "write_weight_norm": 2.0}] if sla else []
    return {"config": config, "accuracy": acc, "loss": 1.0, "train_loss": 1.0, "diverged": False, "sla": sla,
            "metrics": {"cells": cells} if cells else {}, "gates": gates, "timing": {"wall_s": 10.0},
            "device": "test", "backend": "reference", "versions": {"torch": "x"}, "date": "2026-01-01T00:00:00Z"}


def test_report_selects_the_best_learning_rate_and_pairs_baseline_with_sla(tmp_path):
    records = [synthetic_record("gla", 1e-3, 0, 0.5), synthetic_record("gla", 1e-3, 1, 0.5),
               synthetic_record("gla", 3e-3, 0, 0.6), synthetic_record("gla", 3e-3, 1, 0.8),
               synthetic_record("sla_gla", 1e-3, 0, 0.9), synthetic_record("sla_gla", 1e-3, 1, 0.8),
               synthetic_record("sla_gla", 3e-3, 0, 0.1), synthetic_record("sla_gla", 3e-3, 1, 0.2),
               synthetic_record("gla", 1e-3, 0, 0.3, kv=64), synthetic_record("sla_gla", 1e-3, 0, 0.4, kv=64),
               synthetic_record("gla", 1e-3, 0, 0.2, heads=4), synthetic_record("sla_gla", 1e-3, 0, 0.3, heads=4)]
    depth_cells = [{"length": n, "depth": d, "accuracy": a, "token_accuracy": a, "loss": 1.0}
                   for n, a in ((1024, 1.0), (4096, 0.5)) for d in (0.0, 1.0)]
    records += [synthetic_record("gla", 1e-3, 0, 1.0, task="niah", cells=depth_cells),
                synthetic_record("sla_gla", 1e-3, 0, 1.0, task="niah", cells=depth_cells)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": records}))
    cells = {(c.spec, c.field("task"), c.field("kv_pairs"), c.field("heads")): c for c in select_cells(records)}
    assert cells[("gla", "mqar", 16, 8)].lr == 3e-3 and cells[("sla_gla", "mqar", 16, 8)].lr == 1e-3
    written = write_report([path], tmp_path / "report")
    assert sorted(p.name for p in written) == ["mqar_heads.png", "mqar_kv.png", "niah_depth.png",
                                               "niah_length.png", "report.md"]
    assert all(p.stat().st_size > 0 for p in written)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| 256 | 16 | 128 | 8 | gla | 0.700 ± 0.100 (2) | 0.850 ± 0.050 (2) | +0.150 | 0.003 / 0.001 | 100 |" in text
    assert ("| gla | 128 | 8 | 1024 | 1.00±0.00 / 1.00±0.00 (+0.000) | 0.50±0.00 / 0.50±0.00 (+0.000) "
            "| 0.001 / 0.001 | 1 / 1 |") in text
    assert "## Needle in a haystack: accuracy per value token" in text
    assert "G^Q near uniform 2/2" in text  # the SLA cell at kv=16 has two seeds, each one layer at 0.95


def test_report_compares_learning_rates_on_the_seeds_they_share():
    # seed 1 ran only at 1e-3 (the seed-0 winner) and did worse: on all seeds 1e-3 (mean 0.4) would lose to 3e-3
    # (0.5, one seed); on the shared seed 0 it wins (0.6 > 0.5), and its cell keeps both seeds
    records = [synthetic_record("gla", 1e-3, 0, 0.6), synthetic_record("gla", 1e-3, 1, 0.2),
               synthetic_record("gla", 3e-3, 0, 0.5)]
    (cell,) = select_cells(records)
    assert cell.lr == 1e-3 and [r["config"]["seed"] for r in cell.records] == [0, 1]
    assert cell.stat(lambda r: r["accuracy"]) == pytest.approx((0.4, 0.2, 2))


def test_report_rejects_a_file_that_is_not_a_results_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(results.ResultsError, match="runs"):
        write_report([path], tmp_path / "report")
