"""The GPU check's pieces that run without a GPU: the performance-target evaluation (``bench.targets``) on
hand-made benchmark rows, and the shell script's syntax and usage errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench import targets

ROOT = Path(__file__).resolve().parents[1]


def _row(strategy: str, ms: float, pct: float | None, tokens: int = 16384) -> dict:
    return {"tokens": tokens, "strategy": strategy, "fwd_bwd_ms": ms, "pct_dense": pct}


def test_targets_pass_fail_and_missing(tmp_path):
    # Mixtral: blocksparse 80% of dense and 1.5x torch._grouped_mm (pass); grouped 70% (< 75%: FAIL)
    mixtral = [
        _row("blocksparse", 10.0, 80.0),
        _row("grouped", 11.0, 70.0),
        _row("torch_grouped_mm", 15.0, 55.0),
        _row("blocksparse", 99.0, 1.0, tokens=1024),
    ]  # fmt: skip  (a smaller run: not the one judged)
    # fine: both at 60% but grouped only 1.2x torch._grouped_mm (FAIL)
    fine = [_row("blocksparse", 10.0, 60.0), _row("grouped", 12.5, 60.0), _row("torch_grouped_mm", 15.0, 40.0)]
    table, ok = targets.evaluate({"mixtral": mixtral, "fine": fine})
    status = {(r[0], r[2]): r[-1] for r in table}
    assert status == {
        ("mixtral", "blocksparse"): "pass",
        ("mixtral", "grouped"): "FAIL",
        ("fine", "blocksparse"): "pass",
        ("fine", "grouped"): "FAIL",
    }
    assert not ok
    assert [r[5] for r in table] == ["1.50x", "1.36x", "1.50x", "1.20x"]
    # the CLI: exit 1 on a failed target, the table written; an empty run folder is "n/a", not a pass
    for name, rows in (("m", mixtral), ("f", fine)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "none").mkdir()
    assert targets.main(["--mixtral", str(tmp_path / "m"), "--fine", str(tmp_path / "f"), "--out",
                         str(tmp_path / "t.md")]) == 1  # fmt: skip
    assert "FAIL" in (tmp_path / "t.md").read_text()
    table, ok = targets.evaluate({"mixtral": [], "fine": fine[:1] + fine[2:]})
    assert table[0][-1] == "n/a (no run)" and ok  # nothing measured fails nothing


def test_gpu_check_script_syntax_and_usage():
    script = ROOT / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bad = subprocess.run(["bash", str(script), "--fast"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
