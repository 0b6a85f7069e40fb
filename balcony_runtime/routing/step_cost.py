"""What a step costs, as one non-negative linear function of what it runs, fitted over every exit.

A step's time is modelled as

    fixed + per_layer * layers run + per_token_layer * (each decoding row's layers)
          + per_prefill_token_layer * (each prefill token's layers) + per_head_row * rows sampled
          + per_attention_layer * (each (token, key) pair attended, times the layers that attend)

with every coefficient >= 0. "Layers run" counts each decoder layer once, however many rows run it
(its weights are read once: on a CPU or a small batch this is most of the time); a balcony is one
more layer. Since a row at a deeper exit runs more layers, and no term can be negative, a deeper
exit is never predicted cheaper: per-exit costs measured one by one can invert on a busy machine
(a stall in one exit's measurement), one joint fit cannot.

The fit is non-negative least squares on relative error, over the calibration steps and a window of
recent live steps, refitted every few steps: the model follows a machine that slows down or speeds
up, and a shape seen at start-up stays known. No torch: the scheduler and router use it on the CPU.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

FEATURES = ("fixed", "layers", "decode_token_layers", "prefill_token_layers", "head_rows", "attention_layers")


@dataclass(frozen=True)
class RowShape:
    """One row of a step, as the cost model sees it."""

    exit_layer: int  # backbone layers before its exit (the full depth for the full model)
    num_tokens: int  # tokens fed this step (1 for a decode)
    num_cached: int  # tokens already in its cache before this step
    samples: bool = True  # this step ends its known tokens, so it goes through the head


@dataclass(frozen=True)
class StepShape:
    """The features of one step (see the module docstring): what the cost model is linear in."""

    layers: int  # distinct decoder layers run: the deepest row's backbone layers + one per balcony group
    decode_token_layers: int  # sum over decoding rows of the layers each runs
    prefill_token_layers: int  # sum over prefill tokens of the layers each runs
    head_rows: int  # rows through the LM head
    attention_layers: int  # sum over rows of (token, key) pairs attended times layers run

    @classmethod
    def of(cls, rows: Iterable[RowShape], full_depth: int) -> "StepShape":
        rows = list(rows)
        return cls.of_columns([r.exit_layer for r in rows], [r.num_tokens for r in rows],
                              [r.num_cached for r in rows], [r.samples for r in rows], full_depth)

    @classmethod
    def of_columns(cls, exits: Sequence[int], num_tokens: Sequence[int], num_cached: Sequence[int],
                   samples: Sequence[bool], full_depth: int) -> "StepShape":
        """The shape of rows given column by column (what RowShape holds per row)."""
        return cls.of_arrays(list(exits), np.asarray(num_tokens, dtype=np.int64),
                             np.asarray(num_cached, dtype=np.int64), sum(samples), full_depth)

    @classmethod
    def of_arrays(cls, exits: list[int], num_tokens: np.ndarray, num_cached: np.ndarray, head_rows: int,
                  full_depth: int, is_decode: bool | None = None) -> "StepShape":
        """The shape of a step from the arrays the runner builds for it anyway (``num_tokens``,
        ``num_cached``: [B] int64; ``is_decode``: every row feeds one token, when known): the
        engine computes this every step, so it costs a few numpy calls, not a pass per row."""
        if not len(exits):
            return cls(0, 0, 0, 0, 0)
        if is_decode is None:
            is_decode = bool((num_tokens == 1).all())
        if is_decode:
            return DecodeRows.of(exits, full_depth).shape(num_cached + 1, head_rows)
        distinct = set(exits)
        layers = np.minimum(np.asarray(exits, dtype=np.int64) + 1, full_depth)  # [B]: layers_run of each row
        n, c = num_tokens, num_cached
        decode = n == 1  # [B]
        decode_token_layers, prefill_token_layers = int(layers[decode].sum()), int((layers * n)[~decode].sum())
        attention = int((layers * (n * c + n * (n + 1) // 2)).sum())  # attention_pairs per row
        return cls(_distinct_layers(distinct, full_depth), decode_token_layers, prefill_token_layers, head_rows,
                   attention)

    def features(self) -> tuple[float, ...]:
        return (1.0, self.layers, self.decode_token_layers, self.prefill_token_layers, self.head_rows,
                self.attention_layers)


@dataclass(frozen=True)
class DecodeRows:
    """What a decode step's shape takes from its rows' exits alone. A running batch keeps its rows
    for many steps, so the runner keeps this while they stay and per step adds only the attention
    term, which grows with the contexts (one dot product, not the shape's few numpy calls)."""

    layers_of: np.ndarray  # [B] int64: the decoder layers each row runs (layers_run)
    layers: int  # StepShape.layers
    decode_token_layers: int  # StepShape.decode_token_layers

    @classmethod
    def of(cls, exits: Sequence[int], full_depth: int) -> "DecodeRows":
        layers_of = np.minimum(np.asarray(exits, dtype=np.int64) + 1, full_depth)  # [B]
        return cls(layers_of, _distinct_layers(set(exits), full_depth), int(layers_of.sum()))

    def shape(self, context_lens: np.ndarray, head_rows: int) -> StepShape:
        """The step's shape with each row's context after its token (``context_lens`` [B] int64):
        one token attends to its whole context, so a row's attention pairs are its context length."""
        return StepShape(self.layers, self.decode_token_layers, 0, head_rows, int(self.layers_of @ context_lens))


def _distinct_layers(exits: set[int], full_depth: int) -> int:
    """StepShape.layers of rows at these exits: the deepest one's backbone layers, plus a balcony
    for each exit short of the full depth."""
    return min(max(exits), full_depth) + sum(1 for x in exits if x < full_depth)


def layers_run(exit_layer: int, full_depth: int) -> int:
    """Decoder layers a row at ``exit_layer`` runs: k backbone layers and its balcony, or all L."""
    return full_depth if exit_layer >= full_depth else exit_layer + 1


def attention_pairs(tokens: int, cached: int = 0) -> int:
    """(query, key) pairs causal attention visits when ``tokens`` new tokens follow ``cached`` ones."""
    return tokens * cached + tokens * (tokens + 1) // 2


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0, exactly, for the few columns this model has.

    The solution is the unconstrained least-squares solution on its own support, so trying every
    support (2^6 - 1 = 63 small solves) and keeping the best non-negative one is exact and needs no
    iteration tolerance. Columns are scaled to unit norm first (features span 1 to 10^8).

    The solves use the normal equations: with G = a'a and r = a'b, the least-squares x on support S
    solves G[S, S] x = r[S], and its squared residual is b'b - x'r[S], so the best support is the
    non-negative one of largest x'r[S]. All supports of one size are solved in one batched call:
    the live refit runs on the step loop, where 63 least-squares calls over the whole window cost
    milliseconds every few steps. (A ridge of 1e-12 on the unit diagonal keeps a support of
    collinear or empty columns solvable; it moves nothing else measurably.)
    """
    n = a.shape[1]
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    a = a / scale
    gram = a.T @ a + 1e-12 * np.eye(n)  # [n, n], unit diagonal
    atb = a.T @ b  # [n]
    best, best_gain = np.zeros(n), 0.0  # gain x'r[S]: how far below b'b the residual is
    for size in range(1, n + 1):
        supports = np.array(list(itertools.combinations(range(n), size)))  # [K, size]
        g = gram[supports[:, :, None], supports[:, None, :]]  # [K, size, size]
        r = atb[supports]  # [K, size]
        x = np.linalg.solve(g, r[..., None])[..., 0]  # [K, size]
        gain = np.einsum("ks,ks->k", x, r)  # [K]
        gain[(x < 0).any(axis=1)] = -np.inf
        k = int(np.argmax(gain))
        if gain[k] > best_gain:
            best = np.zeros(n)
            best[supports[k]] = x[k]
            best_gain = float(gain[k])
    return best / scale


@dataclass
class StepCostModel:
    """Seconds of a step from its :class:`StepShape`; learns from calibration and live steps."""

    full_depth: int  # the backbone's layer count
    coefficients: tuple[float, ...] = (0.0,) * len(FEATURES)  # seconds per unit of each feature
    window: int = 512  # live steps remembered for refitting
    refit_every: int = 16  # live steps between refits
    anchor_weight: float = 0.5  # weight of calibration steps once live steps fill part of the window
    anchors: list[tuple[tuple[float, ...], float]] = field(default_factory=list)  # calibration (features, s)
    recent: deque = field(default_factory=deque)  # live (features, seconds)
    _since_fit: int = 0

    def __post_init__(self) -> None:
        self.recent = deque(self.recent, maxlen=self.window)

    def seconds(self, shape: StepShape) -> float:
        return float(np.dot(self.coefficients, shape.features()))

    def step_seconds(self, rows: Sequence[RowShape]) -> float:
        """Predicted seconds of a step running ``rows`` (0 for no rows)."""
        return self.seconds(StepShape.of(rows, self.full_depth)) if rows else 0.0

    def fit(self, samples: Iterable[tuple[StepShape, float]]) -> None:
        """Replace the calibration steps with ``samples`` and fit on them."""
        self.anchors = [(shape.features(), seconds) for shape, seconds in samples if seconds > 0]
        self.recent.clear()
        self._refit()

    def observe(self, shape: StepShape, seconds: float) -> None:
        """One measured live step; refits every ``refit_every`` of them."""
        if seconds <= 0:
            return
        self.recent.append((shape.features(), seconds))
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self._refit()

    def _refit(self) -> None:
        self._since_fit = 0
        # Calibration steps weigh less once the live window holds as many: they keep every exit and
        # shape identified, while the live steps say what the machine costs now.
        anchor_w = self.anchor_weight if len(self.recent) >= len(self.anchors) else 1.0
        rows = [(f, s, anchor_w) for f, s in self.anchors] + [(f, s, 1.0) for f, s in list(self.recent)]
        if not rows:
            return
        features = np.array([f for f, _, _ in rows], dtype=np.float64)  # [N, F]
        seconds = np.array([s for _, s, _ in rows], dtype=np.float64)  # [N]
        weights = np.array([w for _, _, w in rows], dtype=np.float64) / seconds  # relative error
        self.coefficients = tuple(float(c) for c in nnls(features * weights[:, None], seconds * weights))

    def describe(self, exits: Sequence[int]) -> dict[str, str]:
        """One row's decode step at each exit (context 128), for logs: increasing by construction."""
        return {str(e): f"{1e3 * self.step_seconds([RowShape(e, 1, 128)]):.1f}ms" for e in exits}
