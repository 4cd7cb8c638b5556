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


def plot_classify(history: dict[str, list], baseline: float, png: Path, title: str) -> None:
    """Task-head fine-tuning (`tasks/classify.py`): train and held-out task loss on the left, held-out accuracy
    beside the majority-class baseline on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    held = history["held_out"]
    if history["train"]:
        steps, _, task, _ = zip(*history["train"], strict=True)
        left.plot(steps, task, "-", label="train (task)", alpha=0.6)
    left.plot([h["step"] for h in held], [h["task_loss"] for h in held], "o-", label="held-out (task)", markersize=3)
    left.set_xlabel("step")
    left.set_ylabel("cross-entropy (nats)")
    left.legend()
    right.plot([h["step"] for h in held], [h["acc"] for h in held], "o-", label="held-out accuracy", markersize=3)
    right.axhline(baseline, color="gray", linestyle="--", label=f"majority class ({baseline:.3f})")
    right.set_xlabel("step")
    right.set_ylabel("accuracy")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_dpo(history: dict[str, list], png: Path, title: str) -> None:
    """Preference training (`tasks/dpo.py`): the implicit rewards of the chosen and rejected answers and their
    margin on the left; the reward accuracy, on the training pairs and held out, on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    rows = history.get("dpo") or []
    if rows:
        steps, chosen, rejected, margin, acc = zip(*rows, strict=True)
        left.plot(steps, chosen, "-", label="chosen")
        left.plot(steps, rejected, "-", label="rejected")
        left.plot(steps, margin, "--", label="margin")
        right.plot(steps, acc, "-", label="train")
    held = history.get("val_dpo") or []
    right.plot([h["step"] for h in held], [h["reward_acc"] for h in held], "o-", label="held-out", markersize=3)
    left.axhline(0, color="gray", linewidth=0.5)
    left.set_xlabel("step")
    left.set_ylabel("beta * log(pi / ref)")
    left.legend()
    right.set_xlabel("step")
    right.set_ylabel("reward accuracy")
    right.set_ylim(-0.05, 1.05)
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
