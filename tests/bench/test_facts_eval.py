"""bench/facts_eval.py: each item's correctness read from lm-eval's samples, and the paired comparison."""

from __future__ import annotations

import json
import stat
import sys

import pytest


def test_exact_mcnemar_matches_hand_computed_binomial_tails(bench_script):
    with bench_script("facts_eval") as facts:
        # n = 6 discordant items split 1 / 5: 2 * P(Bin(6, 1/2) <= 1) = 2 * 7 / 64
        assert facts.mcnemar_exact_p(1, 5) == pytest.approx(14 / 64)
        assert facts.mcnemar_exact_p(5, 1) == pytest.approx(14 / 64)
        # 10 / 0: 2 * 1 / 1024
        assert facts.mcnemar_exact_p(0, 10) == pytest.approx(2 / 1024)
        # an even split is no evidence at all, and no discordant item neither
        assert facts.mcnemar_exact_p(3, 3) == 1.0
        assert facts.mcnemar_exact_p(0, 0) == 1.0


def test_paired_changes_counts_each_direction_and_refuses_other_suites(bench_script):
    with bench_script("facts_eval") as facts:
        assert facts.paired_changes([1, 1, 0, 0, 1], [1, 0, 1, 0, 0]) == (2, 1)
        with pytest.raises(ValueError, match="not the same suite"):
            facts.paired_changes([1, 0], [1, 0, 1])


@pytest.mark.parametrize("task", ["balcony_facts", "balcony_facts_more"])
def test_score_reads_each_item_by_doc_id_from_the_samples_file(bench_script, tmp_path, task):
    """A stand-in for lm_eval writes results and samples the way `--log_samples` does (a model
    folder under --output_path, samples in completion order, not doc order)."""
    fake = tmp_path / "lm_eval"
    fake.write_text(f"""#!{sys.executable}
import json, sys
from pathlib import Path
args = sys.argv[1:]
assert "--log_samples" in args
task = args[args.index("--tasks") + 1]
out = Path(args[args.index("--output_path") + 1]) / "model__name"
out.mkdir(parents=True)
(out / "results_2026.json").write_text(json.dumps({{"results": {{task: {{
    "alias": task, "acc,none": 2 / 3, "acc_stderr,none": 0.3, "acc_norm,none": 1 / 3}}}}}}))
rows = [{{"doc_id": 2, "acc": 1.0, "acc_norm": 0.0}}, {{"doc_id": 0, "acc": 0.0, "acc_norm": 0.0}},
        {{"doc_id": 1, "acc": 1.0, "acc_norm": 1.0}}]
(out / f"samples_{{task}}_2026.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with bench_script("facts_eval") as facts:
        row = facts.score(str(fake), "http://127.0.0.1:1", "m", "tok", tmp_path / "out", task=task)
    assert row["item_acc"] == [0, 1, 1]
    assert row["acc"] == pytest.approx(2 / 3) and row["acc_norm"] == pytest.approx(1 / 3)
    assert "alias" not in row
    assert json.loads(json.dumps(row)) == row
