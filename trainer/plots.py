"""PNG figures of a long-context evaluation (``trainer.evaluate``): matplotlib, an optional extra.

Owns: ``save_plots(result, out_dir, stem)``, which draws the loss-by-position curve, the passkey
accuracy heatmap (length x depth) and, for looped models, the loss-against-loop-count curve, and
``PlotsUnavailable``, raised with the install line when matplotlib is missing (the JSON results
do not depend on it). The Agg backend draws to files without a display.
"""

from __future__ import annotations

from pathlib import Path


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to install it."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable("matplotlib is not installed, so no PNG plots were made (the JSON is written); "
                               "pip install 'longtrain[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _loss_curve(x: list, y: list, xlabel: str, title: str, plt):
    """A figure with one loss curve (markers at the measured points) against ``x``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, y, marker="o")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def plot_loss_by_position(result: dict, path: Path, plt) -> Path:
    rows = [b for b in result["loss_by_position"]["buckets"] if b["loss"] is not None]
    fig, ax = _loss_curve([b["lo"] + 1 for b in rows], [b["loss"] for b in rows],
                          "tokens of context (position + 1, at each log2 bucket's start)",
                          f"loss by position, step {result['step']}, seq_len {result['seq_len']}", plt)
    ax.set_xscale("log", base=2)
    return _save(fig, path, plt)


def plot_passkey(result: dict, path: Path, plt) -> Path:
    pk = result["passkey"]
    fig, ax = plt.subplots(figsize=(6, 4))
    # rows: depths (0% at the top), columns: lengths
    grid = [[pk["accuracy"][j][i] for j in range(len(pk["lengths"]))] for i in range(len(pk["depths"]))]
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(pk["lengths"])), [str(L) for L in pk["lengths"]])
    ax.set_yticks(range(len(pk["depths"])), [f"{100 * d:.0f}%" for d in pk["depths"]])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(f"passkey retrieval, step {result['step']} ({pk['trials']} keys per cell)")
    fig.colorbar(im, ax=ax, label="accuracy")
    return _save(fig, path, plt)


def plot_loss_vs_loops(result: dict, path: Path, plt) -> Path:
    rows = result["loss_vs_loops"]
    fig, ax = _loss_curve([r["loops"] for r in rows], [r["loss"] for r in rows], "loop count",
                          f"loss against loop count, step {result['step']}", plt)
    ax.axvline(result["loops"], color="gray", linestyle="--", label=f"trained mean ({result['loops']})")
    ax.axvline(result["loops_max"], color="gray", linestyle=":", label=f"model.loops_max ({result['loops_max']})")
    ax.legend()
    return _save(fig, path, plt)


def save_plots(result: dict, out_dir: Path, stem: str) -> list[Path]:
    """``<stem>-loss_by_position.png``, ``<stem>-passkey.png`` and (looped) ``<stem>-loss_vs_loops.png``."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    paths = [plot_loss_by_position(result, out_dir / f"{stem}-loss_by_position.png", plt),
             plot_passkey(result, out_dir / f"{stem}-passkey.png", plt)]
    if result.get("loss_vs_loops"):
        paths.append(plot_loss_vs_loops(result, out_dir / f"{stem}-loss_vs_loops.png", plt))
    return paths
