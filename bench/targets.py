"""Issue 10's performance targets, checked against one benchmark run per reference shape (bench/gpu_check.sh):

- Mixtral layer (T=16384, d=4096, f=14336, E=8, k=2): blocksparse and grouped at >= 75% of the same run's dense
  GEMM rate (``pct_dense``: the same useful FLOPs as plain GEMMs), fwd+bwd, bf16;
- fine-grained experts (T=32768, d=2048, f=768, E=128, k=8): >= 55%;
- both: >= 1.3x the ``torch._grouped_mm`` strategy of the same run.

Prints a markdown table (measured values, target, pass / FAIL / n/a) and exits 1 when a measured target fails.
Usage: python -m bench.targets --mixtral DIR --fine DIR [--out FILE]   (DIR: a bench output folder)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGETS = {"mixtral": 75.0, "fine": 55.0}  # percent of the dense GEMM rate
SPEEDUP_VS_GROUPED_MM = 1.3
OURS = ("blocksparse", "grouped")


def _rows(folder: Path) -> list[dict]:
    path = folder / "results.json"
    if not path.exists():
        return []
    return json.loads(path.read_text())["rows"]


def evaluate(runs: dict[str, list[dict]]) -> tuple[list[list[str]], bool]:
    """Table rows ``[shape, tokens, strategy, % dense, target, x torch._grouped_mm, target, status]`` of the
    largest token count of each run, and whether every measured target passed."""
    table, ok = [], True
    for shape, rows in runs.items():
        rows = [r for r in rows if r.get("fwd_bwd_ms") is not None]
        if not rows:
            table.append([shape, "-", "-", "n/a", f">= {TARGETS[shape]:.0f}%", "n/a", f">= {SPEEDUP_VS_GROUPED_MM}",
                          "n/a (no run)"])  # fmt: skip
            continue
        tokens = max(r["tokens"] for r in rows)
        at = {r["strategy"]: r for r in rows if r["tokens"] == tokens}
        ref = at.get("torch_grouped_mm")
        for name in OURS:
            r = at.get(name)
            if r is None:
                table.append([shape, str(tokens), name, "n/a", "", "n/a", "", "n/a (not run)"])
                continue
            pct = r.get("pct_dense")
            speedup = ref["fwd_bwd_ms"] / r["fwd_bwd_ms"] if ref and ref.get("fwd_bwd_ms") else None
            passed = pct is not None and pct >= TARGETS[shape] and (speedup is None or speedup >= SPEEDUP_VS_GROUPED_MM)
            ok &= passed
            table.append([
                shape, str(tokens), name, "n/a" if pct is None else f"{pct:.1f}%", f">= {TARGETS[shape]:.0f}%",
                "n/a" if speedup is None else f"{speedup:.2f}x", f">= {SPEEDUP_VS_GROUPED_MM}x",
                "pass" if passed else "FAIL",
            ])  # fmt: skip
    return table, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__.split("\n\n")[0])
    p.add_argument("--mixtral", type=Path, required=True, help="bench output folder of the Mixtral run")
    p.add_argument("--fine", type=Path, required=True, help="bench output folder of the fine-grained run")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    table, ok = evaluate({"mixtral": _rows(args.mixtral), "fine": _rows(args.fine)})
    head = ["shape", "tokens", "strategy", "% of dense", "target", "vs torch._grouped_mm", "target", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in table]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
