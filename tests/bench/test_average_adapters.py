"""bench/average_adapters.py: the element-wise mean of adapters from one start, refused across backbones."""

from __future__ import annotations

import json

import pytest
import torch

from balcony_runtime.adapters import AdapterMeta, load_adapters, save_adapters


def write(directory, seed: int, exits=(2, 3), fingerprint="abc", width=8):
    g = torch.Generator().manual_seed(seed)
    balconies = {k: {"self_attn.q_proj.weight": torch.randn(width, width, generator=g),
                     "norm.weight": torch.randn(width, generator=g)} for k in exits}
    meta = AdapterMeta("tiny", fingerprint, 4, list(exits), "float16",
                       training={"command": f"balcony train --seed {seed}", "tokens_seen": 64},
                       evaluation={"22": {"english": {"perplexity_ratio": 2.0}}})
    save_adapters(directory, meta, balconies, torch.float16)
    return directory


def test_mean_of_three_is_stored_with_each_source_recorded(bench_script, tmp_path):
    sources = [write(tmp_path / f"run{i}", seed=i) for i in range(3)]
    with bench_script("average_adapters") as avg:
        assert avg.main([str(s) for s in sources] + ["--out", str(tmp_path / "soup")]) == 0
    meta, soup = load_adapters(tmp_path / "soup")
    runs = [load_adapters(s)[1] for s in sources]
    for k in (2, 3):
        for name in ("self_attn.q_proj.weight", "norm.weight"):
            expected = torch.stack([r[k][name].float() for r in runs]).mean(0).half()
            assert soup[k][name].dtype == torch.float16
            assert torch.equal(soup[k][name], expected)
            assert not torch.equal(soup[k][name], runs[0][k][name])
    assert meta.evaluation == {}  # the sources' figures do not describe the mean
    assert [s["command"] for s in meta.training["averaged_from"]] == [f"balcony train --seed {i}" for i in range(3)]
    assert "average_adapters.py" in meta.training["command"]
    assert json.loads((tmp_path / "soup" / "balcony.json").read_text())["exits"] == [2, 3]


@pytest.mark.parametrize("other", [{"fingerprint": "xyz"}, {"exits": (2,)}, {"width": 4}])
def test_adapters_that_do_not_match_are_refused(bench_script, tmp_path, capsys, other):
    a, b = write(tmp_path / "a", 0), write(tmp_path / "b", 1, **other)
    with bench_script("average_adapters") as avg:
        assert avg.main([str(a), str(b), "--out", str(tmp_path / "soup")]) == 2
    assert "average_adapters:" in capsys.readouterr().err
    assert not (tmp_path / "soup").exists()
