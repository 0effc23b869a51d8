"""The report's plots, from the selected cells (`report.select_cells`): baseline solid with filled circles, SLA
dashed with open squares (so a lone point still tells which it is), one colour per setting within a panel, error
bars = half the range over seeds.

    mqar_kv.png       accuracy vs kv pairs; a column per backbone, a row per (T, width, heads)
    mqar_heads.png    accuracy vs heads (only with several head counts); a column per backbone, a row per
                      (T, width), a colour per kv pair count
    niah_depth.png    exact match vs needle depth; a column per backbone, a row per evaluated length, a colour
                      per (width, heads)
    niah_length.png   exact match (mean over depths) vs length; a column per backbone, a colour per (width, heads)
"""

from __future__ import annotations

from pathlib import Path

from sla_dsl.experiments.report import Cell, accuracy, cell_accuracy


def write_plots(cells: list[Cell], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")

    written = []
    mqar = [c for c in cells if c.field("task") == "mqar"]
    needle = [c for c in cells if c.field("task") == "niah"]
    if mqar:
        at_kv = lambda c: [(c.field("kv_pairs"), c.stat(accuracy))]  # noqa: E731
        written.append(_panels(out / "mqar_kv.png",
                               [(c, f"T={c.field('seq_len')} d={c.field('width')} H={c.field('heads')}", at_kv)
                                for c in mqar], colour_of=lambda c: "", xlabel="kv pairs", ylabel="accuracy",
                               log2=True))
        if len({c.field("heads") for c in mqar}) > 1:
            at_heads = lambda c: [(c.field("heads"), c.stat(accuracy))]  # noqa: E731
            written.append(_panels(out / "mqar_heads.png",
                                   [(c, f"T={c.field('seq_len')} d={c.field('width')}", at_heads) for c in mqar],
                                   colour_of=lambda c: f"kv={c.field('kv_pairs')}", xlabel="heads",
                                   ylabel="accuracy", log2=True))
    if needle:
        def at_depths(length):
            return lambda c: [(depth, c.stat(cell_accuracy(length, depth))) for depth in _depths(c)]

        at_lengths = lambda c: [(n, c.stat(cell_accuracy(n))) for n in c.field("eval_lens")]  # noqa: E731
        size = lambda c: f"d={c.field('width')} H={c.field('heads')}"  # noqa: E731
        lengths = sorted({n for c in needle for n in c.field("eval_lens")})
        written.append(_panels(out / "niah_depth.png",
                               [(c, f"T={n}", at_depths(n)) for n in lengths for c in needle],
                               colour_of=size, xlabel="needle depth", ylabel="exact match"))
        written.append(_panels(out / "niah_length.png", [(c, "", at_lengths) for c in needle], colour_of=size,
                               xlabel="length", ylabel="exact match", log2=True))
    return written


def _depths(cell: Cell) -> list[float]:
    return sorted({row["depth"] for record in cell.records for row in record["metrics"]["cells"]})


def _panels(path: Path, items, *, colour_of, xlabel, ylabel, log2=False) -> Path:
    """`items`: (cell, row label, points) with points(cell) = [(x, stat)]. A column per backbone, a row per
    label, one line per (spec, colour_of(cell)) in a panel."""
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(label for _, label, _ in items))
    columns = sorted({cell.backbone for cell, _, _ in items})
    fig, axes = plt.subplots(len(rows), len(columns), squeeze=False, figsize=(3.6 * len(columns), 2.8 * len(rows)))
    for i, row in enumerate(rows):
        for j, backbone in enumerate(columns):
            ax = axes[i][j]
            lines: dict[tuple, tuple[Cell, list]] = {}
            for cell, label, points in items:
                if cell.backbone == backbone and label == row:
                    found = [(x, stat) for x, stat in points(cell) if stat is not None]
                    lines.setdefault((cell.spec, colour_of(cell)), (cell, []))[1].extend(found)
            colours = {}
            for (spec, colour_key), (cell, points) in sorted(lines.items()):
                if not points:
                    continue
                points.sort(key=lambda p: p[0])
                colour = colours.setdefault(colour_key, f"C{len(colours) % 10}")
                ax.errorbar([p[0] for p in points], [p[1][0] for p in points], yerr=[p[1][1] for p in points],
                            color=colour, capsize=2, linestyle="--" if cell.sla else "-",
                            marker="s" if cell.sla else "o", markersize=4,
                            markerfacecolor="none" if cell.sla else colour,
                            label=spec + (f" {colour_key}" if colour_key else ""))
            ax.set_title(backbone + (f", {row}" if row else ""), fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_ylim(-0.05, 1.05)
            if log2:
                ax.set_xscale("log", base=2)
            if lines:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
