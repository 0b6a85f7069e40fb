"""Host time of a decode step: the engine with the model's forward replaced by a stub.

Schedule, prepare, sample, detokenize and post-process all run for real; the stub only returns
logits of the right shape, so what is timed is the work the host does around the forward (on a GPU,
what decides whether the device waits). The stub's logits cover ``vocab`` real token ids: the
sampler's arithmetic over the vocabulary is device work, and on a CPU it would swamp the host work
the benchmark is about (an argmax over 256 x 49152 logits is several milliseconds on two cores).
Shared by bench/host_step.py and ``balcony bench --host-only``.

A simulated device (``device_ms``): each step's forward and sampling occupy a device for that long,
one step after another, as a GPU stream runs them, and reading a step's tokens waits until the
device is done with it. The host spins meanwhile, as a CUDA event wait does by default; the spin is
not counted as host work. Then the step's wall time shows how much of the host's work the device
waits for: about host + device per step when steps run synchronously, about max(host, device) when
they overlap (EngineConfig.overlap_steps).

Through decode graphs (``graphs``): the code path of a GPU. Decode steps go through
model/decode_graphs.py with every recorded piece's replay a no-op, so the forward phase times the
host work a replayed step does around its replays (which rows leave where, the bucket, filling the
static buffers), and the runner and batch state write with torch ops instead of their CPU-only
numpy shortcuts. A small torch op on CPU tensors costs the host about what launching it on a GPU
does; what differs is bytes: on a CPU the static buffers' fills are memory copies the host does, on
a GPU device copies whose launches the host pays for, not their bytes.
"""

from __future__ import annotations

import dataclasses
import gc
import random
import statistics
import time
from dataclasses import dataclass

import torch

from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.heap import serving_heap
from balcony_runtime.loader import LoadedModel
from balcony_runtime.model.forward_batch import ForwardBatch
from balcony_runtime.sampling_params import SamplingParams

_PHASES = ("schedule", "prepare", "forward", "sample", "postprocess")


class StubModel(torch.nn.Module):
    """A BalconyModel's structure (exits, cache layers, device) with a forward that returns fixed
    logits of the right shape. Its KV cache is one element per head, since nothing reads it."""

    def __init__(self, real, vocab: int, seed: int = 0):
        super().__init__()
        self.real = real
        self.arch = dataclasses.replace(real.arch, num_kv_heads=1, head_dim=1)
        self.exits, self.dtype = real.exits, torch.float16
        self.norm = torch.nn.Parameter(torch.zeros(1, device=real.norm.device), requires_grad=False)
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.table = torch.randn(4096, vocab, generator=g).to(real.norm.device)  # rows of logits to hand out

    full_depth = property(lambda self: self.real.full_depth)
    num_cache_layers = property(lambda self: self.real.num_cache_layers)

    def cache_layers_of(self, exit_layer: int) -> list[int]:
        return self.real.cache_layers_of(exit_layer)

    def forward(self, batch: ForwardBatch, kv_cache) -> torch.Tensor:
        return self.logits(len(batch.logits_indices))

    def logits(self, n: int) -> torch.Tensor:
        """The logits it hands out for ``n`` rows: [n, vocab]."""
        return self.table[:n] if n <= len(self.table) else self.table[torch.arange(n) % len(self.table)]


def every_depth(loaded: LoadedModel) -> list[int]:
    """Full depth and every exit, deepest first: the depths a mixed batch's rows take in turn."""
    return [loaded.model.full_depth, *reversed(loaded.model.exits)]


def _no_replay() -> None:
    """A recorded piece's replay in the host-only benchmark: the device work left out."""


class SimulatedDevice:
    """A device that runs one step at a time for ``step_ms`` each: a launched step starts when the
    previous one ends (or at launch, if the device is idle) and its tokens are ready when it ends."""

    def __init__(self, step_ms: float):
        self.step_s = step_ms / 1000
        self.ends: list[float] = []  # time.perf_counter() when each launched step ends, in launch order
        self.waited_cpu_s = 0.0  # CPU time the host spent waiting for it (not host work)

    def paces(self, since: int) -> list[float]:
        """Seconds between the ends of consecutive steps, for the steps launched from ``since`` on:
        the device's own timeline, as a GPU profile shows it. Never below the step's time, since a
        step starts no earlier than the one before it ends; above it by what the device idled
        waiting for the host's launch."""
        return [b - a for a, b in zip(self.ends[max(since - 1, 0):], self.ends[max(since, 1):])]

    def wrap(self, runner) -> None:
        sample = runner.sample  # every launched step ends with it (ModelRunner.launch, or the engine)

        def sampled(*args, **kwargs):
            pending = sample(*args, **kwargs)
            # It starts when launched, or when the device finishes what it was given before.
            self.ends.append(max(time.perf_counter(), self.ends[-1] if self.ends else 0.0) + self.step_s)
            return _SimulatedPending(pending, self.ends[-1], self)

        runner.sample = sampled


class _SimulatedPending:
    """A PendingStep whose result waits for the simulated device."""

    def __init__(self, pending, ready_at: float, device: SimulatedDevice):
        self._pending, self._ready_at, self._device = pending, ready_at, device

    def __getattr__(self, name):
        return getattr(self._pending, name)

    def result(self):
        start = time.thread_time()
        while time.perf_counter() < self._ready_at:
            pass
        self._device.waited_cpu_s += time.thread_time() - start
        return self._pending.result()


@dataclass(frozen=True)
class HostStep:
    rows: int
    context: int
    step_ms: float  # median wall time of engine.step() over the decode steps
    step_cpu_ms: float  # median CPU time of this thread per step: the host work, even on a busy machine
    phase_ms: dict  # phase -> median CPU milliseconds of this thread per step
    device_ms: float = 0.0  # the simulated device's time per step (0: none)
    overlap: bool = False  # steps overlapped (EngineConfig.overlap_steps)

    @property
    def device_idle_ms(self) -> float:
        """Per step, how long the simulated device waited for the host."""
        return max(0.0, self.step_ms - self.device_ms)


def measure_host_step(
    loaded: LoadedModel, rows: int, context: int, steps: int = 30, vocab: int = 512,
    params: SamplingParams | None = None, block_size: int = 16, exit_layer=None,
    device_ms: float = 0.0, overlap: bool = False, recycled: bool = True, queued: int = 0, aligned: bool = False,
    graphs: bool = False,
) -> HostStep:
    """Median host milliseconds per decode step with ``rows`` requests at ``context`` tokens each,
    on a simulated device taking ``device_ms`` per step, steps overlapped or not (see HostStepRun)."""
    run = HostStepRun(loaded, rows, context, steps, vocab, params, block_size, exit_layer, device_ms, overlap,
                      recycled=recycled, queued=queued, aligned=aligned, graphs=graphs)
    return measure_interleaved([run], steps)[0]


def measure_interleaved(runs: list["HostStepRun"], steps: int) -> list[HostStep]:
    """Time ``steps`` decode steps of each run, one step of each in turn: a machine whose speed
    drifts from minute to minute (a shared VM) slows them alike, so their ratio holds. The turns
    go forwards and backwards on alternate steps: runs of the same code stepped always in one order
    measured apart by their place in it (docs/benchmarks.md, "Steady decodes planned from arrays")."""
    # As `balcony serve` does once it is ready (server/serve.py), its step loop in inference mode
    # (server/async_engine.py).
    with serving_heap(), torch.inference_mode():
        for i in range(steps):
            for run in runs if i % 2 == 0 else reversed(runs):
                run.step()
    return [run.result() for run in runs]


def stub_engine(loaded: LoadedModel, rows: int, max_len: int, vocab: int = 512, block_size: int = 16,
                max_num_batched_tokens: int = 8192, overlap: bool = False, engine_module=None) -> LLMEngine:
    """An engine on ``loaded``'s stub (:class:`StubModel`): room for ``rows`` requests of up to
    ``max_len`` tokens. ``engine_module``: where LLMEngine and EngineConfig come from (default this
    checkout's engine module; bench/host_step.py passes an older revision's)."""
    engine_class, config_class = (LLMEngine, EngineConfig) if engine_module is None else \
        (engine_module.LLMEngine, engine_module.EngineConfig)
    stub = StubModel(loaded.model, vocab)
    stub_loaded = dataclasses.replace(loaded, model=stub, max_model_len=max_len)
    per_row_blocks = stub.num_cache_layers * -(-max_len // block_size)
    # Eager: the stub stands in for the whole forward, so there is nothing to record as CUDA graphs.
    config = config_class(max_num_seqs=rows, max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
                          num_kv_blocks=rows * per_row_blocks, enforce_eager=True, overlap_steps=overlap)
    return engine_class(stub_loaded, config)


class HostStepRun:
    """One engine on the stub model, its ``rows`` requests prefilled to ``context`` tokens, ready for
    up to ``steps`` timed decode steps (:meth:`step`, two engine steps each). ``engine_module``: where LLMEngine and
    EngineConfig come from (bench/host_step.py passes an older revision's; default this checkout's).
    ``recycled``: the block pool has served a wave of other prompts first, as a running server's has;
    False times a fresh pool. ``queued``: requests waiting behind the full batch during the timed steps.

    Row i's context is ``context`` - (i mod block_size), as in serving, where rows started at
    different times: each step about one row in block_size reaches a new block and takes one per
    cache layer (evicting cached prefixes from a served pool). ``aligned``: every row at ``context``
    instead, so they all reach a new block in the same step, once every block_size steps, and the
    median step takes none (the layout of the figures docs/benchmarks.md gives before "Rows at
    staggered contexts")."""

    def __init__(self, loaded: LoadedModel, rows: int, context: int, steps: int = 30, vocab: int = 512,
                 params: SamplingParams | None = None, block_size: int = 16, exit_layer=None,
                 device_ms: float = 0.0, overlap: bool = False, engine_module=None, recycled: bool = True,
                 queued: int = 0, aligned: bool = False, young_threshold: int | None = None, graphs: bool = False):
        # ``exit_layer``: one exit for every row (None: full depth), or a sequence that row i takes
        # entry i mod its length of (a mixed-depth batch, as budgets route it).
        exits = list(exit_layer) if isinstance(exit_layer, (list, tuple)) else [exit_layer]
        # Real token ids whose text is mostly whole characters, so the detokenizer works as in serving.
        token_pool = list(range(256, 256 + vocab))
        budget = max(8192, rows)  # tokens per step
        # Rows prefilled first decode while the others prefill: none may finish before the timed steps end.
        prefill_steps = -(-rows * context // (budget - rows)) + 1
        # Each timed step is two engine steps (see step()).
        params = params or SamplingParams(max_tokens=prefill_steps + 2 * steps + 2, temperature=0, ignore_eos=True)
        engine = stub_engine(loaded, rows, context + params.max_tokens, vocab, block_size, budget, overlap,
                             engine_module)
        if graphs:  # every replay a no-op; the logits they would leave are the stub's
            # (Replaced after recording nothing, the same way for an older runner: --baseline.)
            graphed = engine.runner.use_graphs(rows, context + params.max_tokens, record=False)
            graphed._pieces = dict.fromkeys(graphed._pieces, _no_replay)
            graphed.s.logits = engine.runner.model.logits(rows).clone()  # [rows, vocab]
            # The device's code path: the batch state written with torch ops, no host-array shortcuts.
            engine.runner._on_cpu = engine.runner.input_batch.numpy_writes = False
        self.device = SimulatedDevice(device_ms)
        if device_ms:
            self.device.wrap(engine.runner)
        rng = random.Random(0)
        if recycled:
            # A server's pool is soon all cached prompts that nobody holds (prefix caching keeps them
            # findable): a wave of other prompts as long as the engine allows fills the whole pool
            # and ends first, so the timed rows' blocks come from that pool, evicting, as in
            # serving, not from a never-used free list.
            wave = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
            longest = context + params.max_tokens - 1
            for i in range(rows):
                engine.add_request([rng.choice(token_pool) for _ in range(longest)], wave,
                                   exit_layer=exits[i % len(exits)])
            while engine.has_unfinished():
                engine.step()
        for i in range(rows):
            length = context if aligned else max(1, context - i % block_size)
            engine.add_request([rng.choice(token_pool) for _ in range(length)], params,
                               exit_layer=exits[i % len(exits)])
        while any(not t.request.output_token_ids for t in engine._tracked.values()):
            engine.step()  # prefill, in chunks of the token budget
        assert all(len(t.request.output_token_ids) + 2 * steps <= params.max_tokens for t in engine._tracked.values())
        for i in range(queued):  # waiting behind the full batch, as under a burst
            engine.add_request([rng.choice(token_pool) for _ in range(16)], params, exit_layer=exits[i % len(exits)])
        self.engine, self.rows, self.context, self.device_ms, self.overlap = engine, rows, context, device_ms, overlap
        # The collector's young-generation threshold while this run steps (None: the serving
        # process's, balcony_runtime/heap.py), to time the step under another.
        self.young_threshold = young_threshold
        self.phases: dict[str, list[float]] = {p: [] for p in _PHASES}
        self.timers = PhaseTimers(engine, self.phases)
        self.wall: list[float] = []  # seconds per timed step
        self.cpu: list[float] = []  # CPU seconds of this thread per timed step, the device's wait excluded

    def step(self) -> None:
        """Two engine steps: one timed whole, one timed phase by phase. The phases' timers (two
        clock reads and a call each, about 1 us a phase on a VM, whose thread clock is a system call)
        would otherwise be counted as host work in the step's own time."""
        device, threshold = self.device, gc.get_threshold()
        if self.young_threshold is not None:  # (put back below)
            gc.set_threshold(self.young_threshold, *threshold[1:])
        launched = len(device.ends)
        start, start_cpu, waited = time.perf_counter(), time.thread_time(), device.waited_cpu_s
        self.engine.step()
        bare = time.perf_counter() - start
        self.cpu.append(time.thread_time() - start_cpu - (device.waited_cpu_s - waited))
        with self.timers:
            self.engine.step()
        # On a simulated device a step's wall time is the device's pace: the time between the ends
        # of consecutive steps on its own timeline. A host clock read around the steps cannot give
        # it: the step in flight when the pair starts began before the clock did, so any host time
        # outside the pair (a preemption on a busy machine) shortened the pair's reading below the
        # device's time. Without a device, the bare step's wall time.
        self.wall.extend(device.paces(launched) if self.device_ms else [bare])
        gc.set_threshold(*threshold)

    def result(self) -> HostStep:
        return HostStep(self.rows, self.context, 1e3 * statistics.median(self.wall), 1e3 * statistics.median(self.cpu),
                        {p: 1e3 * statistics.median(v) for p, v in self.phases.items() if v}, self.device_ms, self.overlap)


class PhaseTimers:
    """Times the step's phases while entered (``with timers: engine.step()``), by putting timing
    wrappers over the objects' bound methods (instance attributes), taken off again on exit."""

    def __init__(self, engine: LLMEngine, times: dict):
        def timed(fn, phase):
            def call(*args, **kwargs):
                start = time.thread_time()
                out = fn(*args, **kwargs)
                times[phase].append(time.thread_time() - start)
                return out
            return call

        runner, sampler = engine.runner, engine.runner.sampler
        methods = [(engine.scheduler, "schedule", "schedule"), (runner, "prepare", "prepare"),
                   (sampler, "sample", "sample"),  # rows asking for logprobs
                   (engine, "_postprocess", "postprocess")]
        if hasattr(sampler, "sample_on_device"):  # (bench/host_step.py --baseline: an older sampler)
            methods.append((sampler, "sample_on_device", "sample"))
        if getattr(runner, "graphs", None) is not None:  # decode steps replayed (the model called for the others)
            methods.append((runner.graphs, "run", "forward"))
        self._wrappers = [(owner, name, timed(getattr(owner, name), phase)) for owner, name, phase in methods]
        self._runner, self._model = runner, runner.model
        self._timed_model = _TimedModel(runner.model, timed)

    def __enter__(self) -> "PhaseTimers":
        for owner, name, wrapper in self._wrappers:
            setattr(owner, name, wrapper)
        self._runner.model = self._timed_model
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, _ in self._wrappers:
            delattr(owner, name)  # the class's method shows through again
        self._runner.model = self._model


class _TimedModel:
    def __init__(self, model, timed):
        self._model, self._call = model, timed(model, "forward")

    def __call__(self, *args):
        return self._call(*args)

    def __getattr__(self, name):
        return getattr(self._model, name)
