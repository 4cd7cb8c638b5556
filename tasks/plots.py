"""Charts the training stages save beside their models, for MLflow to show as artifacts."""

from __future__ import annotations

from pathlib import Path


def plot_loss(history: dict[str, list], png: Path, title: str) -> None:
    """The train and val loss curves of a `history.json` ({"train": [[step, loss], ...], "val": [...]})."""
    import matplotlib

    matplotlib.use("Agg")  # no display on Ray workers or CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for split, style in (("train", "-"), ("val", "o-")):
        if history.get(split):
            steps, losses = zip(*history[split], strict=True)
            ax.plot(steps, losses, style, label=split, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
