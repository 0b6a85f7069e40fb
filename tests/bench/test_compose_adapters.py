"""bench/compose_adapters.py: one run's balcony at a chosen exit, the base's elsewhere, with both
runs' records; refused across backbones or for an exit the adapters do not have."""

from __future__ import annotations

import pytest
import torch

from balcony_runtime.adapters import load_adapters

from .test_average_adapters import write


def test_taken_exit_comes_from_its_source_and_the_rest_from_the_base(bench_script, tmp_path):
    base, other = write(tmp_path / "base", seed=0), write(tmp_path / "other", seed=1)
    with bench_script("compose_adapters") as compose:
        assert compose.main([str(base), "--take", f"2={other}", "--out", str(tmp_path / "out")]) == 0
    meta, composed = load_adapters(tmp_path / "out")
    _, b = load_adapters(base)
    _, o = load_adapters(other)
    for name in ("self_attn.q_proj.weight", "norm.weight"):
        assert torch.equal(composed[2][name], o[2][name]) and not torch.equal(composed[2][name], b[2][name])
        assert torch.equal(composed[3][name], b[3][name])
    assert meta.evaluation == {}  # neither source's figures describe the mix
    assert meta.training["base"]["command"] == "balcony train --seed 0"
    assert meta.training["exits_taken"]["2"]["command"] == "balcony train --seed 1"
    assert "compose_adapters.py" in meta.training["command"]
    assert meta.training["tokens_seen_total"] == 64  # each source saw 64 (test_average_adapters.write)


@pytest.mark.parametrize("take, message", [("9", "not among the adapters' exits"), ("x", "EXIT=ADAPTERS")])
def test_an_exit_the_adapters_lack_is_refused(bench_script, tmp_path, capsys, take, message):
    base, other = write(tmp_path / "base", seed=0), write(tmp_path / "other", seed=1)
    with bench_script("compose_adapters") as compose:
        try:
            code = compose.main([str(base), "--take", f"{take}={other}", "--out", str(tmp_path / "out")])
        except SystemExit as exc:  # argparse's refusal of a malformed --take
            code = exc.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_source_for_another_backbone_is_refused(bench_script, tmp_path, capsys):
    base, other = write(tmp_path / "base", seed=0), write(tmp_path / "other", seed=1, fingerprint="xyz")
    with bench_script("compose_adapters") as compose:
        assert compose.main([str(base), "--take", f"2={other}", "--out", str(tmp_path / "out")]) == 2
    assert "another backbone" in capsys.readouterr().err
