"""Matplotlib PNGs: time vs tokens per strategy, % of the dense rate, dropped fraction vs capacity factor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_all"]


def _groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows per layer shape (everything but the token count)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        key = f"d={r['hidden']} f={r['ffn']} E={r['experts']} k={r['top_k']} {r['routing']} {r['dtype']}"
        out.setdefault(key, []).append(r)
    return out


def _series(rows: list[dict[str, Any]], value: str) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in sorted(rows, key=lambda r: r["tokens"]):
        v = r.get(value)
        if v is None:
            continue
        xs, ys = series.setdefault(r["strategy"], ([], []))
        xs.append(r["tokens"])
        ys.append(v)
    return series


def _figure(groups: dict[str, list[dict[str, Any]]]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    return plt, fig, axes[0]


def plot_all(rows: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """Write the three PNGs into ``out_dir``; returns their paths (none when there are no rows)."""
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    groups = _groups(rows)
    paths = []

    plt, fig, axes = _figure(groups)
    for ax, (key, grp) in zip(axes, groups.items()):
        for name, (xs, ys) in _series(grp, "fwd_bwd_ms").items():
            ax.plot(xs, ys, marker="o", label=name)
        for name, (xs, ys) in _series([r for r in grp if r.get("fwd_bwd_ms") is None], "fwd_ms").items():
            ax.plot(xs, ys, marker="x", linestyle="--", label=f"{name} (fwd only)")
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="fwd+bwd time (ms)", title=key)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "time_vs_tokens.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    plt, fig, axes = _figure(groups)
    for ax, (key, grp) in zip(axes, groups.items()):
        for name, (xs, ys) in _series([r for r in grp if r["strategy"] != "dense"], "pct_dense").items():
            ax.plot(xs, ys, marker="o", label=name)
        ax.axhline(100, color="k", linewidth=0.8)
        ax.set(xscale="log", xlabel="tokens", ylabel="useful TFLOP/s, % of dense GEMM", title=key)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "pct_dense.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    plt, fig, axes = _figure(groups)
    for ax, (key, grp) in zip(axes, groups.items()):
        by_tokens: dict[int, list[tuple[float, float]]] = {}
        for r in grp:
            if r.get("capacity_factor") is not None:
                by_tokens.setdefault(r["tokens"], []).append((r["capacity_factor"], 100 * r["dropped_fraction"]))
        for tokens, pts in sorted(by_tokens.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"T={tokens}")
        ax.set(xlabel="capacity factor", ylabel="dropped assignments (%)", title=key)
        if by_tokens:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "drops_vs_capacity_factor.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
