"""End-of-run outputs for people: a summary table and a metric plot (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .rounds import RoundRecord

_TIMES = (("train", 1), ("aggregate", 2), ("eval", 1))


def _cell(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def summary_table(records: Sequence[RoundRecord]) -> str:
    """A fixed-width text table: one row per round with the metrics, loss, traffic and timings (a
    round 0, the base model before training, has metrics and eval time only)."""
    if not records:
        return "(no complete rounds)"
    metric_names = [k for k in records[-1].eval or {} if k != "score"]
    head = ["round", *metric_names, "mean loss", "ranks", "MB sent", "train s", "agg s", "eval s"]
    rows = []
    for r in records:
        seconds = r.seconds or {}
        if r.clients is None:  # round 0: the base model, before any training
            mean_loss, ranks = "-", "-"
        else:
            mean_loss = f"{sum(c.loss for c in r.clients) / max(1, len(r.clients)):.4f}"
            ranks = ",".join(str(c.rank) for c in r.clients)
        rows.append(
            [
                str(r.round),
                *(_cell(r.eval.get(m, float("nan"))) for m in metric_names),
                mean_loss,
                ranks,
                f"{(r.cumulative_bytes or 0) / 1e6:.2f}",
                *(f"{seconds[k]:.{d}f}" if k in seconds else "-" for k, d in _TIMES),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def plot_history(
    records: Sequence[RoundRecord],
    path: str | os.PathLike,
    metric: str = "score",
    *,
    strategy: str | None = None,
    baseline: dict[str, float] | None = None,
) -> Path | None:
    """Save a PNG with the eval metric against round and against cumulative megabytes communicated.

    Round 0 is the first point of both (0 MB): a round-0 record (the base model, instruction
    tuning), or else ``baseline``, the evaluation of the initial global adapter (classification:
    LoRA ``B = 0`` and the seeded classifier head, before any training). ``strategy`` names the
    line and the figure's title.

    Returns:
        The file written, or ``None`` when there is nothing to plot.
    """
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    points = [(r.round, r.eval[metric], (r.cumulative_bytes or 0) / 1e6) for r in records]
    start = None
    if records[0].round == 0:
        start = "round 0: base model"
    elif baseline is not None and metric in baseline:
        points.insert(0, (0, baseline[metric], 0.0))
        start = "round 0: initial adapter"
    rounds, values, megabytes = (list(column) for column in zip(*points))
    label = records[-1].eval_metric or metric
    name = strategy or records[-1].strategy or "global adapter"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    left.plot(rounds, values, marker="o", label=name)
    right.plot(megabytes, values, marker="o", color="tab:orange", label=name)
    if start is not None:
        for axis, x in ((left, rounds[0]), (right, megabytes[0])):
            axis.plot([x], [values[0]], marker="s", color="gray", linestyle="none", label=start)
    left.set(xlabel="round", ylabel=label, title=f"{label} by round")
    right.set(xlabel="cumulative MB communicated (up + down)", ylabel=label, title=f"{label} by traffic")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize="small")
    fig.suptitle(f"strategy: {name}")
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["plot_history", "summary_table"]
