"""bench.nonfinite_cost runs and reports both modes (counts only, no times)."""

from __future__ import annotations

from bench import nonfinite_cost


def test_nonfinite_cost_reports_both_modes(capsys):
    nonfinite_cost.main(["--cases", "mlp-tiny:2"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("mlp-tiny")]
    assert [r[2] for r in rows] == ["raise", "drop"]
    raise_ops, drop_ops = (int(r[3]) for r in rows)
    assert 0 < raise_ops < drop_ops  # "drop" adds its isfinite / where / count ops, nothing else of the step moves
    assert rows[0][4] == rows[1][4]  # "drop" adds no host read
