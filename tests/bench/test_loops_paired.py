"""bench/loops_paired.py: two loop counts over the same prompts, compared prompt by prompt."""

from __future__ import annotations

import json

import pytest


def _run(prompts: int, looped: dict[str, list[int]], decoding: dict | None = None) -> dict:
    return {"prompts": prompts, "max_tokens": 64, "decoding": decoding or {"temperature": 0.0},
            "exits": {name: {"loops": len(ids) / prompts, "looped_prompts": ids} for name, ids in looped.items()}}


def test_counts_the_prompts_that_stop_and_start_looping(bench_script):
    with bench_script("loops_paired") as paired:
        before = _run(10, {"8": [0, 1, 2, 3, 4, 5], "22": [0, 1]})
        after = _run(10, {"8": [4, 5, 9], "22": [0, 1], "full": [7]})
        rows = paired.paired_loops(before, after)
        assert set(rows) == {"8", "22"}  # "full" is in one file only
        assert (rows["8"]["stopped"], rows["8"]["started"]) == (4, 1)
        # exact two-sided McNemar on 4 against 1: 2 * P(X <= 1), X ~ Binomial(5, 1/2)
        assert rows["8"]["p"] == pytest.approx(2 * (1 + 5) / 32, abs=1e-4)
        assert (rows["22"]["stopped"], rows["22"]["started"], rows["22"]["p"]) == (0, 0, 1.0)
        assert rows["8"]["before"] == 0.6 and rows["8"]["after"] == 0.3


def test_refuses_runs_over_other_prompts_or_decoding(bench_script, tmp_path, capsys):
    with bench_script("loops_paired") as paired:
        with pytest.raises(ValueError, match="decoding"):
            paired.paired_loops(_run(10, {"8": []}), _run(10, {"8": []}, {"temperature": 0.0, "frequency_penalty": 0.5}))
        with pytest.raises(ValueError, match="prompts"):
            paired.paired_loops(_run(10, {"8": []}), _run(12, {"8": []}))
        with pytest.raises(ValueError, match="no exit"):
            paired.paired_loops(_run(10, {"8": []}), _run(10, {"15": []}))
        a, b = tmp_path / "a.json", tmp_path / "b.json"
        a.write_text(json.dumps(_run(4, {"22": [0, 1, 2]})))
        b.write_text(json.dumps(_run(4, {"22": [2, 3]})))
        assert paired.main([str(a), str(b), "--json-out", str(tmp_path / "o.json")]) == 0
        assert "| 22 | 0.750 | 0.500 | 2 | 1 |" in capsys.readouterr().out
        assert json.loads((tmp_path / "o.json").read_text())["exits"]["22"]["stopped"] == 2
        assert paired.main([str(a), str(tmp_path / "missing.json")]) == 2
        assert "loops_paired:" in capsys.readouterr().err
