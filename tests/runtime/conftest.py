"""Models for runtime tests: the default SmolLM2-135M and a tiny random LLaMA, plus a paged harness."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from balcony_runtime.block_manager import BlockManager
from balcony_runtime.kv_cache import KVCache
from balcony_runtime.loader import LoadedModel, load_model
from balcony_runtime.model_runner import ModelRunner
from balcony_runtime.request import Request
from balcony_runtime.sampling_params import SamplingParams
from balcony_runtime.scheduler import ScheduledRequest


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir) -> LoadedModel:
    loaded = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2, 3), dtype="float32", device="cpu")
    perturb_balconies(loaded.model, seed=1)
    return loaded


@pytest.fixture(scope="session")
def tiny_hf(tiny_model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def perturb_balconies(model, seed: int, scale: float = 0.05) -> None:
    """Make each balcony differ from the backbone layer it was copied from."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for balcony in model.balconies.values():
            for p in balcony.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale * p.float().std().clamp_min(0.1))


class PagedHarness:
    """Drives the model's paged forward directly: rows at chosen exits, all logits returned."""

    def __init__(self, loaded: LoadedModel, num_blocks: int = 512, block_size: int = 4):
        self.model = loaded.model
        self.blocks = BlockManager(num_blocks, block_size)
        kv = KVCache.allocate(self.model.arch, num_blocks, block_size, self.model.dtype, "cpu")
        self.runner = ModelRunner(self.model, kv, self.blocks)
        self._ids = itertools.count()

    def new_request(self, token_ids: list[int], exit_layer: int) -> Request:
        layers = len(self.model.cache_layers_of(exit_layer))
        request = Request(f"r{next(self._ids)}", list(token_ids), SamplingParams(), exit_layer, layers, 0.0)
        self.blocks.allocate(request.request_id, layers, 0)
        return request

    @torch.inference_mode()
    def feed(self, chunks: list[tuple[Request, int]]) -> list[torch.Tensor]:
        """Feed each request its next ``n`` known tokens in one step; returns per-request logits [n, V].

        ``chunks`` must be ordered deepest exit first, as the scheduler orders rows."""
        scheduled = []
        for request, n in chunks:
            start = request.num_computed_tokens
            self.blocks.grow(request.request_id, start + n)
            scheduled.append(ScheduledRequest(request, start, n))
        batch, _ = self.runner.prepare(scheduled)
        batch.logits_indices = list(range(batch.input_ids.numel()))
        logits = self.model(batch, self.runner.kv_cache.as_tuple())
        for item in scheduled:
            item.request.num_computed_tokens += item.num_tokens
        return list(logits.split([n for _, n in chunks]))


@pytest.fixture
def harness():
    """Factory of paged harnesses: ``harness(loaded, num_blocks=..., block_size=...)``."""
    return PagedHarness


@pytest.fixture
def idle_machine(monkeypatch):
    """Start-up measurements see an idle machine whatever else runs beside the tests (they cache
    nothing measured beside busy processes; that case has its own tests)."""
    from balcony_runtime.cpu_contention import CpuContention

    monkeypatch.setattr(CpuContention, "others_cores", lambda self: 0.0)


@pytest.fixture
def count_preemptions():
    """A function stepping an engine until nothing is left; it returns the most preemptions any
    tracked request had meanwhile."""

    def run(engine) -> int:
        preempted = 0
        while engine.has_unfinished():
            engine.step()
            preempted = max(preempted, sum(t.request.num_preemptions for t in engine._tracked.values()))
        return preempted

    return run
