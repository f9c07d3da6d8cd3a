"""`jaxlm plot WORKDIR [WORKDIR ...] --out runs.png`: training curves of one or more runs.

Reads each workdir's metrics.jsonl (what `jaxlm train` writes) and draws, runs overlaid and
named by their directories: loss and eval_loss (and a mixture's eval_loss/<entry>) with the
loss baselines logged at the start
(the unigram loss of a causal LM), accuracies with theirs (a masked LM's majority guess, a
contrastive batch's chance, a train.eval_tasks set's chance), the learning rate, throughput
and MFU. Matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from etils import epath

from jaxlm.config import ConfigError

BASELINE = re.compile(r"^eval_\w+_(loss|accuracy|chance)$")
ACCURACY = ("accuracy", "top1", "_acc", "_acc_norm")  # key endings drawn in the accuracy panel
DPI = 100
MARKERS = "s^vD*"  # one per data.files entry of a mixture: eval_loss/<entry>


def read_metrics(workdir: str | Path) -> list[dict]:
    """metrics.jsonl of a local or cloud (`gs://`) workdir."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{workdir}: no metrics.jsonl (is it a jaxlm train workdir?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _name(workdir: str | Path) -> str:
    text = str(workdir).rstrip("/")
    return text.rsplit("/", 1)[-1] if "://" in text else Path(text).resolve().name


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of key, one value per step: where a step was logged twice (a file
    written before resumes dropped what came after the resumed step), the later one."""
    by_step = {r["step"]: r[key] for r in records if key in r and r["step"] > 0}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot(workdirs: list[str], out: str | Path) -> dict[str, list[str]]:
    """Write the figure to `out` (1500 x 900 pixels); returns each panel's line labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if Path(out).is_dir():
        raise ConfigError(f"--out {out}: a directory; name the image file to write")
    if Path(out).suffix.lower()[1:] not in formats:
        raise ConfigError(  # matplotlib would add .png to a name without one, or raise
            f"--out {out}: expected the name of an image file, ending in one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    runs = {_name(w): read_metrics(w) for w in workdirs}
    for w, records in zip(workdirs, runs.values(), strict=True):
        if not any(r["step"] > 0 for r in records):  # the start's baselines at most
            raise ConfigError(f"{w}: its metrics.jsonl has no training step yet: nothing to plot")
    fig, axes = plt.subplots(2, 3, figsize=(15, 9), dpi=DPI)
    panels = dict(zip(["loss", "accuracy", "lr", "throughput", "mfu"], axes.flat, strict=False))
    axes.flat[-1].axis("off")
    drawn: dict[str, list[str]] = {name: [] for name in panels}

    def line(panel: str, steps, values, label: str, **style) -> None:
        if steps:
            panels[panel].plot(steps, values, label=label, **style)
            drawn[panel].append(label)

    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        keys = {k for r in records if r["step"] > 0 for k in r}
        line("loss", *_series(records, "loss"), f"{name} loss", color=color, alpha=0.6)
        line("loss", *_series(records, "eval_loss"), f"{name} eval_loss", color=color, marker="o")
        for j, key in enumerate(sorted(k for k in keys if k.startswith("eval_loss/"))):
            entry = {"marker": MARKERS[j % len(MARKERS)], "markersize": 4, "linestyle": ":"}
            line("loss", *_series(records, key), f"{name} {key}", color=color, **entry)
        for key in sorted(k for k in keys if k.endswith(ACCURACY)):
            held_out = {"marker": "o", "markersize": 3} if key.startswith("eval_") else {}
            line("accuracy", *_series(records, key), f"{name} {key}", color=color, **held_out)
        line("lr", *_series(records, "lr"), name, color=color)
        for key in sorted(k for k in keys if k.endswith("_per_s")):
            line("throughput", *_series(records, key), f"{name} {key}", color=color)
        line("mfu", *_series(records, "mfu"), name, color=color)
        start = next((r for r in records if r["step"] == 0), {})  # logged before training
        for key, value in start.items():
            if m := BASELINE.match(key):
                panel = "loss" if m.group(1) == "loss" else "accuracy"
                panels[panel].axhline(value, color=color, linestyle="--", linewidth=1)
                drawn[panel].append(f"{name} {key} (baseline)")
                panels[panel].plot([], [], color=color, linestyle="--", label=drawn[panel][-1])
    for name, ax in panels.items():
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn[name]:
            ax.legend(fontsize=8)
    panels["loss"].set_ylabel("nats")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return drawn
