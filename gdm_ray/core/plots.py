"""Pictures people look at instead of numbers: trigger and example grids."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["save_examples"]


def _to_hwc(img: torch.Tensor):
    img = img.detach().float().clamp(0, 1).cpu()
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def save_examples(
    path: Path,
    clean: torch.Tensor,
    triggered: torch.Tensor,
    clean_pred: list[str],
    triggered_pred: list[str],
    pattern: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    title: str = "",
) -> Path:
    """A grid: the trigger (pattern and alpha) on the left, then clean images
    (top row) and the same images triggered (bottom row), each captioned with
    the model's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = clean.shape[0]
    extra = 1 if pattern is not None else 0
    fig, axes = plt.subplots(2, n + extra, figsize=(1.6 * (n + extra), 4.0), squeeze=False)
    grey = "gray" if clean.shape[1] == 1 else None
    if pattern is not None:
        axes[0][0].imshow(_to_hwc(pattern), cmap=grey, vmin=0, vmax=1, interpolation="nearest")
        axes[0][0].set_title("trigger", fontsize=8)
        if alpha is not None:
            axes[1][0].imshow(alpha.detach().cpu().numpy(), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            axes[1][0].set_title("alpha", fontsize=8)
    for i in range(n):
        for row, imgs, preds in ((0, clean, clean_pred), (1, triggered, triggered_pred)):
            ax = axes[row][i + extra]
            ax.imshow(_to_hwc(imgs[i]), cmap=grey, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(preds[i], fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
