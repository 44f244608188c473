"""Combine a ``gpu_check.sh`` run into one markdown report and print its short summary table.

``python -m bench.summary --out REPORT.md --steps steps.tsv [--audit audit.md] RUN_DIR...`` where ``steps.tsv``
holds ``name<TAB>status<TAB>seconds`` lines and each ``RUN_DIR`` is a ``python -m bench --out`` folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["summary_table", "main"]


def _load(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def summary_table(runs: dict[str, dict[str, Any]]) -> str:
    """Per preset, the largest token count: time, rate, % dense, speedup vs padded, drops and bytes saved for
    backward per token for each strategy."""
    lines = [
        "| preset | T | strategy | fwd+bwd ms | TFLOP/s | % dense | x vs padded@1.25 | dropped | saved B/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, data in runs.items():
        rows = data["rows"]
        if not rows:
            continue
        top = max(r["tokens"] for r in rows)
        for r in (r for r in rows if r["tokens"] == top):
            t = r.get("fwd_bwd_ms")
            cells = [
                name,
                top,
                r["strategy"],
                f"{t:.3g}" if t is not None else f"fwd {r['fwd_ms']:.3g}",
                f"{r['tflops']:.3g}" if r.get("tflops") is not None else "n/a",
                f"{r['pct_dense']:.0f}" if r.get("pct_dense") is not None else "n/a",
                f"{r['speedup_vs_padded@1.25']:.2f}" if r.get("speedup_vs_padded@1.25") is not None else "n/a",
                f"{r['dropped_fraction']:.1%}" if r.get("dropped_fraction") is not None else "n/a",
                f"{r['saved_bytes_per_token']:.0f}" if r.get("saved_bytes_per_token") is not None else "n/a",
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="python -m bench output folders")
    p.add_argument("--steps", type=Path, required=True, help="name<TAB>status<TAB>seconds per line")
    p.add_argument("--audit", type=Path, default=None, help="the audit's stdout (markdown table)")
    p.add_argument("--title", default="GPU check")
    p.add_argument("--out", type=Path, required=True, help="the combined markdown report")
    args = p.parse_args(argv)

    steps = [line.split("\t") for line in args.steps.read_text().splitlines() if line.strip()]
    step_table = "\n".join(["| step | status | s |", "|---|---|---|", *(f"| {' | '.join(s)} |" for s in steps)])
    runs = {d.name: data for d in args.runs if (data := _load(d)) is not None}
    meta = next(iter(runs.values()))["metadata"] if runs else {}
    facts = ", ".join(f"{k} {meta[k]}" for k in ("gpu", "cpu", "torch", "triton", "cuda", "git_commit") if meta.get(k))
    parts = [f"# {args.title}\n", f"{facts}\n" if facts else "", "## Steps\n", step_table, ""]
    if runs:
        parts += ["## Summary (largest token count per preset)\n", summary_table(runs), ""]
    if args.audit is not None and args.audit.exists():
        parts += ["## Compile audit (`python -m bench.audit`)\n", args.audit.read_text(), ""]
    for d in args.runs:
        md = d / "results.md"
        if md.exists():
            parts += [f"## {d.name}\n", md.read_text(), f"Files: `{d}` (results.csv, results.json, PNGs)\n"]
    args.out.write_text("\n".join(parts))
    print(step_table)
    if runs:
        print()
        print(summary_table(runs))
    print(f"\nreport: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
