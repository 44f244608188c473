"""``python -m bench.ep`` (``python -m bench --ep N``): argument checks, and one tiny run on 2 gloo processes
whose table has a row per chunk count and rank."""

from __future__ import annotations

import pytest

from bench import ep


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--impl", "padded"], "--impl: invalid choice: 'padded'"),  # padded needs a layer (capacity per rank)
        (["--chunks", "1,0"], "--chunks must be comma-separated positive integers, got '1,0'"),
        (["--chunks", "two"], "--chunks must be comma-separated positive integers"),
        (["--capacity-per-rank", "-1"], "--capacity-per-rank must be a non-negative integer, got -1"),
    ],
)
def test_parse_args_names_the_bad_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        ep.parse_args(["--world", "2", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_runs_and_reports_each_chunk_count():
    table = ep.main(
        ["--world", "2", "--tokens", "9", "--hidden", "8", "--ffn", "8", "--experts", "4", "--chunks", "1,3"]
        + ["--iters", "1", "--warmup", "0", "--backend", "gloo"]
    )
    assert "CPU figures" in table
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| ") and "chunks" not in line]
    assert sorted((int(c), int(r)) for c, r in rows) == [(1, 0), (1, 1), (3, 0), (3, 1)]
