"""Matplotlib figures, always written with the headless Agg backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (true class per row) with the counts written in each cell."""
    counts = np.asarray(matrix, dtype=float)
    rates = counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None)
    size = 1.2 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, f"{int(value)}", ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


@dataclass
class Curve:
    """One line of a figure: y against x, with optional error bars: (N,) symmetric (e.g. the std over seeds)
    or (2, N), the distances below and above each point (an interval)."""

    x: Sequence[float]
    y: Sequence[float]
    err: Sequence[float] | Sequence[Sequence[float]] | None = None


def plot_curves(
    panels: dict[str, dict[str, Curve]],
    path: str | Path,
    xlabel: str,
    ylabel: str = "",
    logx: bool = False,
    thresholds: dict[str, tuple[float, str]] | None = None,
) -> Path:
    """Side-by-side panels of labelled lines; ``thresholds[title] = (y, label)`` marks a line in that panel.

    One function for label-fraction curves, robustness sweeps and training curves, so they all look alike.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items(), strict=True):
        for label, curve in curves.items():
            ax.errorbar(curve.x, curve.y, yerr=curve.err, marker="o", markersize=4, capsize=3, label=label)
        if thresholds and title in thresholds:
            y, label = thresholds[title]
            ax.axhline(y, color="tab:red", linestyle="--", linewidth=1, label=label)
        ticks = sorted({x for curve in curves.values() for x in curve.x})
        if logx:
            ax.set_xscale("log")
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        elif all(float(t).is_integer() for t in ticks):  # epochs, batch sizes
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_bars(
    bars: dict[str, tuple[float, float]], path: str | Path, ylabel: str, title: str = ""
) -> Path:
    """One bar per label with its error bar: ``{label: (mean, std)}``."""
    labels = list(bars)
    means = [bars[label][0] for label in labels]
    errors = [bars[label][1] for label in labels]
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(labels), 3.8))
    ax.bar(range(len(labels)), means, yerr=errors, capsize=4, color=plt.cm.tab10.colors[: len(labels)])
    ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right")
    for i, mean in enumerate(means):
        ax.text(i, mean, f"{mean:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_heatmaps(
    images: np.ndarray, maps: dict[str, np.ndarray], path: str | Path, captions: Sequence[str], title: str = ""
) -> Path:
    """One row per image: the image, then each column's heat map (values in [0, 1]) over it.

    ``images`` is (N, H, W, 3) in [0, 1]; each entry of ``maps`` is (N, H, W) for one model.
    """
    columns = 1 + len(maps)
    fig, axes = plt.subplots(len(images), columns, figsize=(2.2 * columns, 2.2 * len(images) + 0.4), squeeze=False)
    for row, image in enumerate(images):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(captions[row], fontsize=8)
        for col, (label, heat) in enumerate(maps.items(), start=1):
            axes[row, col].imshow(image)
            axes[row, col].imshow(heat[row], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            if row == 0:
                axes[row, col].set_title(label, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


@dataclass
class ForestRow:
    """One difference of a forest plot: its label, point estimate and interval, and its kind (the legend
    entry that picks its colour and marker, e.g. a verdict)."""

    label: str
    estimate: float
    low: float
    high: float
    kind: str


def plot_forest(
    rows: Sequence[ForestRow], styles: dict[str, tuple[str, str]], path: str | Path, xlabel: str, title: str = ""
) -> Path:
    """One row per difference, top to bottom in the given order: the point estimate with its interval as a
    horizontal bar, a line at 0 (no difference), colour and marker by kind (``styles[kind] = (colour,
    marker)``), so the reader sees at once which intervals exclude 0."""
    fig, ax = plt.subplots(figsize=(9, 1.1 + 0.28 * len(rows)))
    positions = np.arange(len(rows))[::-1]
    for kind, (colour, marker) in styles.items():
        chosen = [(y, row) for y, row in zip(positions, rows, strict=True) if row.kind == kind]
        if not chosen:
            continue
        ys = [y for y, _ in chosen]
        estimates = np.array([row.estimate for _, row in chosen])
        errors = np.array([[row.estimate - row.low, row.high - row.estimate] for _, row in chosen]).T
        ax.errorbar(estimates, ys, xerr=errors, fmt=marker, color=colour, ecolor=colour, capsize=3,
                    markersize=6, label=kind)
    ax.axvline(0, color="black", linewidth=1)
    ax.set_yticks(positions, [row.label for row in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
