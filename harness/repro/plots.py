"""Pictures of one failing tensor, as PNG beside the issue body: a per-(batch, head) heat map of
error / scale and error / scale against position (query row for out/dQ, key row for dK/dV).

Optional: needs the `plots` extra (matplotlib). Without it nothing is drawn and the caller is
told so; the harness itself never imports matplotlib.
"""

from __future__ import annotations

from pathlib import Path

from ..core.results import TensorVerdict


def available() -> str | None:
    """None when matplotlib can be imported, else why not."""
    try:
        import matplotlib  # noqa: F401 - optional (the `plots` extra): only asked for here
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); pip install 'gqa-harness[plots]'"
    return None


def draw_failure(verdict: TensorVerdict, out_dir: Path, title: str, factors: dict[str, float] | None = None) -> list[Path]:
    """heads.png and positions.png for `verdict`'s tensor; [] when matplotlib is missing."""
    if available() is not None or verdict.metrics is None:
        return []
    import matplotlib  # optional (the `plots` extra), checked by available() above

    matplotlib.use("Agg")
    import matplotlib.colors  # noqa: F401 - the optional dependency's own module, for TwoSlopeNorm
    import matplotlib.pyplot as plt  # after use("Agg"): no display on a CI runner

    name = verdict.tensor
    heads = verdict.metrics.levels["slice"].ratio.double()
    rows = verdict.metrics.levels["row"].ratio.double()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(max(4.0, 0.4 * heads.shape[1] + 2), max(2.5, 0.4 * heads.shape[0] + 1.5)))
    # centred on the slice factor: a barely passing head reads yellow, not "best"
    factor = (factors or {}).get("slice", 2.5)
    norm = matplotlib.colors.TwoSlopeNorm(vmin=0.0, vcenter=factor, vmax=max(2 * factor, float(heads.max())))
    im = ax.imshow(heads.numpy(), cmap="RdYlGn_r", norm=norm, aspect="auto")
    ax.set_xticks(range(heads.shape[1]))
    ax.set_yticks(range(heads.shape[0]))
    ax.set_xlabel("kv head" if name in ("dk", "dv") else "query head")
    ax.set_ylabel("batch")
    ax.set_title(f"{name}: error / scale per (batch, head)\n{title}", fontsize=9)
    fig.colorbar(im, ax=ax)
    if heads.numel() <= 64:
        for (b, h), value in zip(((b, h) for b in range(heads.shape[0]) for h in range(heads.shape[1])), heads.flatten()):
            ax.text(h, b, f"{float(value):.2g}", ha="center", va="center", fontsize=7, color="black")
    paths.append(out_dir / "heads.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    flat = rows.reshape(-1, rows.shape[-1])
    if flat.shape[-1] == 1:  # decode: one query row per (batch, head); plot it across the heads instead
        ax.plot(flat[:, 0].numpy(), "o", color="C3", label="the one row of each (batch, head)")
        ax.set_xlabel("(batch, head), batch-major")
    else:
        marker = "o" if flat.shape[-1] <= 8 else None
        for series in flat[:64]:
            ax.plot(series.numpy(), color="0.75", linewidth=0.6, marker=marker)
        ax.plot(flat.amax(0).numpy(), color="C3", linewidth=1.2, marker=marker, label="worst (batch, head)")
        ax.set_xlabel("key position" if name in ("dk", "dv") else "query position")
    if factors and "row" in factors:
        ax.axhline(factors["row"], color="k", linestyle="--", linewidth=0.8, label=f"row factor {factors['row']:g}")
    ax.set_yscale("log")
    ax.set_ylabel("row error / scale")
    ax.set_title(f"{name}: error / scale by position\n{title}", fontsize=9)
    ax.legend(fontsize=8)
    paths.append(out_dir / "positions.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths
