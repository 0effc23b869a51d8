"""Issue 7: do SLA head gates improve in-context retrieval? Small-scale MQAR and needle-in-a-haystack runs.

    mqar.py, niah.py   the task generators          tasks.py     training batches and scoring per task
    grid.py            runs, presets, grids          training.py  one run: model, optimizer, loop, evaluation
    runner.py          a grid: resume, time budget   results.py   the JSON results file
    diagnostics.py     SLA gate entropy and norms    report.py, plots.py   markdown report and figures
    protocol.py        --seeds-at-best-lr: the lr sweep at the first seed, the other seeds at its winner
    command.py         `python -m sla_dsl experiment mqar|niah|report`
"""
