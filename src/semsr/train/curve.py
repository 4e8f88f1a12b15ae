"""Training curve PNG from the JSON-lines log (``log.jsonl``).

Top panel: training loss per step (thin) with an exponential moving average
(thick) and every loss term when there are several; learning rate on a
second axis. Bottom row (only when validation ran): one small panel per
validation metric.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from semsr.eval.atomic import write_bytes


def read_log(path: Path) -> list[dict[str, Any]]:
    """Parse a JSON-lines log, skipping a torn last line (a run killed mid-write)."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def plot_curve(records: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """Draw the loss/LR (and validation) curves of ``records`` into PNG ``out`` (atomically)."""
    import matplotlib  # heavy dependency, imported on use

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # heavy dependency, after selecting the Agg backend

    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "val" and r.get("metrics")]
    names = sorted({k for r in val for k in r["metrics"]})
    rows, cols = (2, len(names)) if names else (1, 1)
    fig = plt.figure(figsize=(max(7, 3 * cols), 3.2 * rows))
    grid = fig.add_gridspec(rows, cols)
    ax = fig.add_subplot(grid[0, :])
    if train:
        steps = [r["step"] for r in train]
        loss = [r["loss"] for r in train]
        ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=0.8, label="loss")
        ax.plot(steps, _smooth(loss), color="tab:blue", lw=1.8, label="loss (EMA)")
        terms = sorted({k for r in train for k in r.get("terms", {})})
        if len(terms) > 1:
            for name in terms:
                ax.plot(steps, [r.get("terms", {}).get(name, math.nan) for r in train], lw=0.8, label=name)
        if min(loss) > 0 and max(loss) / min(loss) > 20:
            ax.set_yscale("log")
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("lr", math.nan) for r in train], color="tab:orange", lw=0.8, ls="--")
        ax2.set_ylabel("learning rate", color="tab:orange")
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no training steps logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title or "training curve")
    for i, name in enumerate(names):
        vax = fig.add_subplot(grid[1, i])
        pts = [(r["step"], r["metrics"][name]) for r in val if name in r["metrics"]]
        vax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i + 2}")
        vax.set_xlabel("step")
        vax.set_title(f"validation {name}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes(out, buf.getvalue())
    return out
