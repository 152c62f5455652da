"""PNG figures: the histogram of patch-token lengths with the calibrated threshold, and per image the
last block's CLS attention over the patch grid before and after ITAE, overlaid on the image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .outputs import OutputTransaction, write_text_atomic


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """'1 token', '2 tokens', '0 tokens' (nouns: an irregular plural, e.g. 'classes')."""
    return f"{n} {noun if n == 1 else (nouns or noun + 's')}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path, tx: OutputTransaction | None = None) -> Path:
    """Render `fig` as PNG to `out`: staged in `tx` (committed with the caller's other outputs) when
    given, else through its own output transaction (an existing file is replaced)."""
    plt = _pyplot()
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    if tx is None:
        return write_text_atomic(out, buf.getvalue(), force=True)
    staged = tx.stage_path(out)
    staged.write_bytes(buf.getvalue())
    tx.add(staged, out)
    return Path(out)


def plot_norm_histogram(
    lengths: np.ndarray,
    out: str | Path,
    *,
    threshold: float | None = None,
    title: str = "patch-token lengths, last block",
    xlabel: str = "token length (log scale)",
    bins: int = 120,
    note: str | None = None,
    tx: OutputTransaction | None = None,
) -> Path:
    """Histogram of the lengths on a log x axis and log count axis (the view where the artifact mode
    shows), with the threshold as a vertical line. tx: an output transaction that has `out` among its
    destinations (the PNG is staged there), else the PNG is written on its own."""
    plt = _pyplot()
    x = np.asarray(lengths, dtype=np.float64).ravel()
    x = x[np.isfinite(x) & (x > 0)]
    fig, ax = plt.subplots(figsize=(7, 4))
    if x.size:
        lo, hi = x.min(), x.max()
        edges = np.geomspace(lo, hi if hi > lo else lo * 1.01, bins + 1)
        ax.hist(x, bins=edges, color="#4c72b0", alpha=0.85)
        ax.set_xscale("log")
        ax.set_yscale("log")
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        # Ticks at 1, 2, 5 x 10^k with plain numbers: the length range often spans less than a decade.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
    if threshold is not None:
        ax.axvline(threshold, color="#c44e52", lw=2, label=f"threshold {threshold:.4g}")
        if x.size:
            ax.legend(title=f"{(x > threshold).mean() * 100:.2f}% above")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens")
    ax.set_title(title)
    if note:
        ax.text(0.01, 0.98, note, transform=ax.transAxes, va="top", fontsize=8)
    return _save(fig, out, tx)


def cls_attention_map(cls_attn: np.ndarray, num_prefix_tokens: int, grid: tuple[int, int]) -> np.ndarray:
    """[H, T] CLS-row attention of one image -> [gh, gw] mean over heads of the patch columns."""
    a = np.asarray(cls_attn, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    gh, gw = grid
    patches = a[:, num_prefix_tokens:]
    if patches.shape[1] != gh * gw:
        raise ValueError(f"{plural(patches.shape[1], 'patch column')} cannot fill a {gh}x{gw} grid")
    return patches.mean(axis=0).reshape(gh, gw)


def plot_attention_overlay(
    image: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    out: str | Path,
    *,
    flagged: np.ndarray | None = None,
    title: str = "",
    tx: OutputTransaction | None = None,
) -> Path:
    """image uint8 [H, W, 3]; before/after [gh, gw] attention maps (one colour scale for both, so the
    shift of attention is visible); flagged: optional bool [gh, gw] of the tokens ITAE attenuated."""
    plt = _pyplot()
    h, w = image.shape[:2]
    vmax = float(max(before.max(), after.max()))
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    axes[0].imshow(image)
    axes[0].set_title("input (preprocessed)")
    for ax, m, name in ((axes[1], before, "CLS attention, before ITAE"), (axes[2], after, "after ITAE")):
        ax.imshow(image)
        im = ax.imshow(
            m, cmap="viridis", alpha=0.6, extent=(0, w, h, 0), interpolation="nearest", vmin=0, vmax=vmax
        )
        ax.set_title(name)
        if flagged is not None and flagged.any():
            gh, gw = flagged.shape
            ys, xs = np.nonzero(flagged)
            ax.scatter(
                (xs + 0.5) * w / gw,
                (ys + 0.5) * h / gh,
                marker="s",
                s=30,
                facecolors="none",
                edgecolors="red",
                lw=1,
            )
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes[1:].tolist(), fraction=0.03, pad=0.02, label="attention (mean over heads)")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, out, tx)


def attention_figure_paths(out_dir: str | Path, n: int, names: list[str] | None = None) -> list[Path]:
    """Where attention_figures writes its n PNGs (to declare them in an output transaction up front)."""
    return [Path(out_dir) / f"{names[b] if names else f'image_{b:04d}'}.png" for b in range(n)]


def attention_figures(
    stats: dict, images: np.ndarray, out_dir: str | Path, *, names: list[str] | None = None,
    tx: OutputTransaction | None = None,
) -> list[Path]:
    """One PNG per image from itae_export.reference.last_block_stats output ("cls_attn_before"/"after"
    [B,H,T], "flagged", "num_prefix_tokens", "grid") and the preprocessed images uint8 [B, H, W, 3].
    tx: an output transaction over attention_figure_paths(out_dir, B, names) (else one file at a time)."""
    out_dir = Path(out_dir)
    npt = int(stats["num_prefix_tokens"])
    grid = tuple(int(g) for g in stats["grid"])
    flagged_all = np.asarray(stats.get("flagged")) if stats.get("flagged") is not None else None
    paths = []
    targets = attention_figure_paths(out_dir, images.shape[0], names)
    for b in range(images.shape[0]):
        before = cls_attention_map(stats["cls_attn_before"][b], npt, grid)
        after = cls_attention_map(stats["cls_attn_after"][b], npt, grid)
        fl = None
        if flagged_all is not None:
            f = flagged_all[b]
            f = f.any(axis=0) if f.ndim == 2 else f  # head scope: flagged in any head
            fl = f[npt:].reshape(grid)
        name = names[b] if names else f"image_{b:04d}"
        n_flag = int(fl.sum()) if fl is not None else 0
        paths.append(
            plot_attention_overlay(
                images[b],
                before,
                after,
                targets[b],
                flagged=fl,
                title=f"{name}: {plural(n_flag, 'token')} attenuated",
                tx=tx,
            )
        )
    return paths
