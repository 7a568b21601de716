"""Pictures people look at instead of numbers: trigger and example grids."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["save_examples", "save_level_grid", "save_pca_scatter", "save_curves", "save_heatmap", "save_zoo_scores", "save_sweep"]


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, title: str = "") -> None:
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    mask: torch.Tensor | None = None,
    title: str = "",
) -> Path:
    """A grid: the trigger (pattern and mask) on the left, then clean images
    (top row) and the same images triggered (bottom row), each captioned with
    the model's prediction."""
    plt = _pyplot()

    n = clean.shape[0]
    extra = 1 if pattern is not None else 0
    fig, axes = plt.subplots(2, n + extra, figsize=(1.6 * (n + extra), 4.0), squeeze=False)
    grey = "gray" if clean.shape[1] == 1 else None
    if pattern is not None:
        axes[0][0].imshow(_to_hwc(pattern), cmap=grey, vmin=0, vmax=1, interpolation="nearest")
        axes[0][0].set_title("trigger", fontsize=8)
        if mask is not None:
            axes[1][0].imshow(mask.detach().cpu().numpy(), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            axes[1][0].set_title("mask", fontsize=8)
    for i in range(n):
        for row, imgs, preds in ((0, clean, clean_pred), (1, triggered, triggered_pred)):
            ax = axes[row][i + extra]
            ax.imshow(_to_hwc(imgs[i]), cmap=grey, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(preds[i], fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, path, title)
    return path


def _composite(pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Show a trigger over mid-grey so its mask is visible."""
    return (1 - mask.unsqueeze(0)) * 0.5 + mask.unsqueeze(0) * pattern


def save_level_grid(
    path: Path,
    samples: list[tuple[torch.Tensor, torch.Tensor]],
    title: str = "",
    row_labels: list[str] | None = None,
    titles: list[list[str]] | None = None,
) -> Path:
    """One row per level: its sampled triggers (pattern blended on grey by mask);
    ``titles[r][c]`` captions single cells."""
    plt = _pyplot()

    rows, cols = len(samples), max(len(p) for p, _ in samples)
    cell_h = 1.25 if titles else 0.95
    fig, axes = plt.subplots(rows, cols, figsize=(0.9 * cols + 1.2, cell_h * rows + 0.6), squeeze=False)
    for r, (patterns, masks) in enumerate(samples):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(patterns):
                img = _composite(patterns[c].cpu(), masks[c].cpu())
                ax.imshow(_to_hwc(img), cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1, interpolation="nearest")
                if titles and c < len(titles[r]):
                    ax.set_title(titles[r][c], fontsize=6)
        axes[r][0].set_ylabel(row_labels[r] if row_labels else f"level {r}", fontsize=7, rotation=0, ha="right", va="center")
    _save(fig, path, title)
    return path


def save_pca_scatter(path: Path, samples: list[torch.Tensor], title: str = "", labels: list[str] | None = None) -> Path:
    """2-D PCA of flattened trigger samples, coloured by level (the paper's figure)."""
    plt = _pyplot()

    flat = [s.detach().float().flatten(1).cpu() for s in samples]
    allx = torch.cat(flat)
    mean = allx.mean(0, keepdim=True)
    # principal axes from the SVD of the centred samples
    _, _, v = torch.linalg.svd(allx - mean, full_matrices=False)
    axes2 = v[:2].T
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, f in enumerate(flat):
        pts = (f - mean) @ axes2
        ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.6, color=cmap(i / max(1, len(flat) - 1)), label=labels[i] if labels else f"level {i}")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, markerscale=2)
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, path)
    return path


def save_curves(path: Path, history: list[dict[str, float]], title: str = "") -> Path:
    """ASR and MI estimate of each level over training."""
    plt = _pyplot()

    levels = sorted({int(r["level"]) for r in history})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    cmap = plt.get_cmap("viridis")
    for lv in levels:
        rows = [r for r in history if int(r["level"]) == lv]
        steps = [r["step"] for r in rows]
        color = cmap(lv / max(1, len(levels) - 1))
        a1.plot(steps, [r["asr"] for r in rows], color=color, label=f"level {lv} (beta {rows[0]['beta']:.2f})")
        a1.axhline(rows[0]["beta"], color=color, linestyle=":", linewidth=0.8)
        a2.plot(steps, [r["mi"] for r in rows], color=color)
    a1.set_xlabel("step")
    a1.set_ylabel("ASR of samples")
    a1.set_ylim(-0.02, 1.02)
    a1.legend(fontsize=7)
    a2.set_xlabel("step")
    a2.set_ylabel("MI estimate (nats)")
    _save(fig, path, title)
    return path


def save_heatmap(
    path: Path,
    heat: torch.Tensor,
    image: torch.Tensor,
    box: tuple[int, int, int, int],
    best: tuple[torch.Tensor, torch.Tensor] | None = None,
    title: str = "",
) -> Path:
    """The moving-window heat map beside an example image with the hot box
    drawn, and (optionally) the strongest window's trigger applied to it."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    panels = 3 if best is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels + 0.6, 2.9))
    im = axes[0].imshow(heat.cpu().numpy(), cmap="inferno", vmin=0, interpolation="nearest")
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.04)
    axes[0].set_title("trigger strength", fontsize=8)
    gray = image.shape[0] == 1
    axes[1].imshow(_to_hwc(image.cpu()), cmap="gray" if gray else None, vmin=0, vmax=1, interpolation="nearest")
    r0, c0, h, w = box
    for ax in axes[:2]:
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), w, h, fill=False, edgecolor="cyan", linewidth=1.5))
    axes[1].set_title(f"hot box {h}x{w} at ({r0}, {c0})", fontsize=8)
    if best is not None:
        pattern, mask = (t.cpu() for t in best)
        after = (1 - mask) * image.cpu() + mask * pattern
        axes[2].imshow(_to_hwc(after), cmap="gray" if gray else None, vmin=0, vmax=1, interpolation="nearest")
        axes[2].set_title("strongest window's trigger", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, path, title)
    return path


def save_zoo_scores(path: Path, ids: list[str], scores: list[float | None], threshold: float, title: str = "") -> Path:
    """One bar per model (its anomaly score), red above the threshold; models
    that failed to load get a grey 'error' mark instead of a bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(ids) + 1.5), 3.2))
    xs = range(len(ids))
    vals = [0.0 if s is None else float(s) for s in scores]
    colors = ["lightgrey" if s is None else ("tab:red" if s > threshold else "tab:blue") for s in scores]
    ax.bar(xs, vals, color=colors)
    for x, s in zip(xs, scores):
        if s is None:
            ax.text(x, 0, "error", rotation=90, ha="center", va="bottom", fontsize=7, color="dimgrey")
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xticks(list(xs), ids, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("anomaly score")
    ax.legend(fontsize=7)
    _save(fig, path, title)
    return path


def save_sweep(
    path: Path,
    names: list[str],
    values: list[float | None],
    best: int | None,
    metric: str,
    x_name: str | None = None,
    xs: list[float] | None = None,
    ys: list[float | None] | None = None,
    groups: list[str] | None = None,
    y_name: str = "ASR after defense",
    title: str = "",
) -> Path:
    """A sweep at a glance: one bar per trial (its ``metric``, the best one
    green, failed trials a grey 'error' mark) and, when ``x_name`` is given,
    ``ys`` (e.g. the ASR after the defense) against that parameter (e.g.
    mask, log scale when positive), one colour per ``groups`` value (e.g.
    the trigger size)."""
    plt = _pyplot()
    two = x_name is not None and xs is not None and ys is not None
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(max(4.0, 0.45 * len(names) + 1.5) + (4.2 if two else 0), 3.4), squeeze=False)
    ax = axes[0][0]
    pos = range(len(names))
    ax.bar(
        pos,
        [0.0 if v is None else float(v) for v in values],
        color=["lightgrey" if v is None else ("tab:green" if i == best else "tab:blue") for i, v in enumerate(values)],
    )
    for i, v in enumerate(values):
        if v is None:
            ax.text(i, 0, "error", rotation=90, ha="center", va="bottom", fontsize=7, color="dimgrey")
    ax.set_xticks(list(pos), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"{metric} (lower is better)")
    if two:
        ax2 = axes[0][1]
        labels = groups if groups is not None else [""] * len(xs)  # type: ignore[arg-type]
        for label in dict.fromkeys(labels):
            pts = sorted((x, y) for x, y, g in zip(xs, ys, labels) if g == label and y is not None)  # type: ignore[arg-type]
            if pts:
                ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", alpha=0.8, label=label or None)
        if all(x > 0 for x in xs):  # type: ignore[union-attr]
            ax2.set_xscale("log")
        ax2.set_xlabel(x_name)
        ax2.set_ylabel(y_name)
        if groups is not None:
            ax2.legend(fontsize=7)
    _save(fig, path, title)
    return path
