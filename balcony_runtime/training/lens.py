"""A closed-form start for balconies (issue 12): an affine "lens" map fitted by ridge least squares.

For each exit k the frozen backbone is run (no grad, chunked) over N tokens, and with
X = [residual stream after k layers, 1] ([T, H+1]) and Y = the residual stream after L-1 layers
([T, H], the INPUT of the last decoder layer, which every balcony starts as a copy of), the sums
X^T X and X^T Y are accumulated in fp64. Ridge least squares then gives [W^T; b] =
(X^T X + lam * s * I')^-1 X^T Y, with I' the identity on the weight rows only (the bias is not
penalised) and s the mean diagonal of the weight block (so lam is scale free). lam is chosen per exit
on a held-out slice of the fit tokens (every ``heldout_every``-th sequence), whose sums give the
held-out squared error of any candidate in closed form:
||Y - X B||^2 = tr(Y^T Y) - 2 tr(B^T X^T Y) + tr(B^T X^T X B).

Mapping to the residual after all L layers and then applying the copied last layer would apply that
layer twice; the map must target what the copied layer expects (DESIGN §4 pilot: 13x against 2.5x).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from balcony_runtime.model.balcony_model import BalconyModel
from balcony_runtime.training.dense_forward import backbone_pass

LAMBDAS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class NormalEquations:
    """Sums of one exit's least-squares problem, fp64: X = [x, 1] ([T, H+1]), Y ([T, H])."""

    xtx: torch.Tensor  # [H+1, H+1]
    xty: torch.Tensor  # [H+1, H]
    yty: float = 0.0  # sum of squares of Y (held-out error in closed form)
    tokens: int = 0

    @classmethod
    def zeros(cls, hidden: int) -> "NormalEquations":
        return cls(torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64),
                   torch.zeros(hidden + 1, hidden, dtype=torch.float64))

    def add(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """x, y: [T, H] in any float dtype; weight: [T] per-token weights of the squared error (None: 1)."""
        x64 = torch.cat([x.double(), x.new_ones(x.shape[0], 1, dtype=torch.float64)], dim=1)  # [T, H+1]
        y64 = y.double()  # [T, H]
        wx = x64 if weight is None else x64 * weight.double()[:, None]  # [T, H+1]
        # The sums stay on the CPU (the solve and the held-out error read them there); the products
        # are made where the activations are.
        self.xtx += (wx.T @ x64).to(self.xtx.device)  # [H+1, H+1]
        self.xty += (wx.T @ y64).to(self.xty.device)  # [H+1, H]
        self.yty += float((y64.pow(2).sum(1) * (1.0 if weight is None else weight.double())).sum())
        self.tokens += x.shape[0]

    def squared_error(self, b: torch.Tensor) -> float:
        """sum ||Y - X B||^2 for B [H+1, H], from the sums alone."""
        return self.yty - 2.0 * float((b * self.xty).sum()) + float((b * (self.xtx @ b)).sum())


def solve_ridge(eq: NormalEquations, lam: float) -> torch.Tensor:
    """B = [W^T; b]: [H+1, H], fp64; lam scaled by the mean diagonal of the weight block, bias free."""
    h = eq.xtx.shape[0] - 1
    a = eq.xtx.clone()  # [H+1, H+1]
    scale = float(a.diagonal()[:h].mean())
    a.diagonal()[:h] += lam * scale
    try:
        return torch.linalg.solve(a, eq.xty)  # [H+1, H]
    except RuntimeError:  # singular without regularisation: least-norm solution
        return torch.linalg.lstsq(a, eq.xty, driver="gelsd").solution


@dataclass
class LensFit:
    """What a fit produced, per exit: W [H, H], b [H] (fp64) and its report."""

    weights: dict[int, tuple[torch.Tensor, torch.Tensor]]
    report: dict = field(default_factory=dict)


@torch.no_grad()
def token_weights(y: torch.Tensor, weighting: str) -> torch.Tensor | None:
    """Per-token weights of the squared error. "none": plain least squares, which the few tokens with
    huge residual norms (attention sinks: first positions, special tokens) dominate; "relative": each
    token's error relative to its target's mean square, 1 / mean(y_t^2), so every token counts alike."""
    if weighting == "none":
        return None
    if weighting == "relative":
        return 1.0 / y.double().pow(2).mean(dim=1).clamp_min(1e-6)  # [T]
    raise ValueError(f"lens weighting must be 'none' or 'relative', got {weighting!r}")


def accumulate(model: BalconyModel, batches, exits: tuple[int, ...], heldout_every: int, amp,
               log=None, weighting: str = "none") -> tuple[dict[int, NormalEquations], dict[int, NormalEquations], dict]:
    """Run the frozen backbone over ``batches`` (iterable of [B, S] ids) and sum the normal equations;
    every ``heldout_every``-th batch goes to the held-out sums."""
    target = model.full_depth - 1  # input of the last decoder layer
    hidden_size = model.arch.hidden_size
    fit = {k: NormalEquations.zeros(hidden_size) for k in exits}
    held = {k: NormalEquations.zeros(hidden_size) for k in exits}
    t0, backbone_s = time.perf_counter(), 0.0
    for i, ids in enumerate(batches):
        t = time.perf_counter()
        with amp():
            states = backbone_pass(model, ids, set(exits) | {target})
        backbone_s += time.perf_counter() - t
        y = sum(states.at_exit[target])  # [T, H]: hidden + residual after L-1 layers
        sums = held if heldout_every and i % heldout_every == heldout_every - 1 else fit
        weight = token_weights(y, weighting)  # [T] or None
        for k in exits:
            sums[k].add(sum(states.at_exit[k]), y, weight)  # x: [T, H]
        if log and (i + 1) % 10 == 0:
            done = sum(e.tokens for e in fit.values()) // len(exits) + sum(e.tokens for e in held.values()) // len(exits)
            log(f"lens fit: {done:,} tokens, {time.perf_counter() - t0:.0f} s")
    timing = {"wall_s": round(time.perf_counter() - t0, 1), "backbone_s": round(backbone_s, 1)}
    return fit, held, timing


def fit_lens(model: BalconyModel, batches, exits: tuple[int, ...], heldout_every: int = 10,
             lambdas: tuple[float, ...] = LAMBDAS, amp=None, log=None, weighting: str = "none") -> LensFit:
    """Fit each exit's lens map; lam per exit by the held-out squared error (refit on all tokens)."""
    import contextlib

    fit, held, timing = accumulate(model, batches, exits, heldout_every, amp or contextlib.nullcontext, log,
                                   weighting)
    weights, per_exit = {}, {}
    for k in exits:
        errors = {}
        if held[k].tokens:
            for lam in lambdas:
                errors[lam] = held[k].squared_error(solve_ridge(fit[k], lam)) / (held[k].tokens * model.arch.hidden_size)
            best = min(errors, key=errors.get)
        else:
            best = lambdas[min(len(lambdas) - 1, 3)]
        both = NormalEquations(fit[k].xtx + held[k].xtx, fit[k].xty + held[k].xty,
                               fit[k].yty + held[k].yty, fit[k].tokens + held[k].tokens)
        b = solve_ridge(both, best)  # [H+1, H]
        weights[k] = (b[:-1].T.contiguous(), b[-1].clone())  # W [H, H] (x' = x W^T + b), b [H]
        identity_error = None
        if held[k].tokens:  # the held-out error of no map at all, for scale
            eye = torch.cat([torch.eye(model.arch.hidden_size, dtype=torch.float64),
                             torch.zeros(1, model.arch.hidden_size, dtype=torch.float64)])
            identity_error = held[k].squared_error(eye) / (held[k].tokens * model.arch.hidden_size)
        per_exit[str(k)] = {
            "lambda": best,
            "heldout_mse": {f"{lam:g}": round(e, 6) for lam, e in errors.items()},
            "heldout_mse_identity": None if identity_error is None else round(identity_error, 6),
            "heldout_target_mean_square": round(held[k].yty / max(1, held[k].tokens * model.arch.hidden_size), 6),
        }
    report = {
        "target": f"residual stream after {model.full_depth - 1} layers (input of the last layer)",
        "fit_tokens": fit[exits[0]].tokens, "heldout_tokens": held[exits[0]].tokens,
        "heldout_every": heldout_every, "weighting": weighting, "lambda_scale": "times the mean diagonal of X^T X's weight block",
        "exits": per_exit, **timing,
    }
    return LensFit(weights, report)


@torch.no_grad()
def apply_lens(model: BalconyModel, fit: LensFit, norm: str = "final") -> None:
    """Write the fitted maps into the balconies, whose layer becomes a copy of the backbone's last layer
    and whose final norm a copy of the backbone's final norm (``norm="final"``: what the copied last
    layer's output is normalised with) or of ``layers[k].input_layernorm`` (``"exit"``, the paper's)."""
    if norm not in ("final", "exit"):
        raise ValueError(f"lens norm must be 'final' or 'exit', got {norm!r}")
    for k, (w, b) in fit.weights.items():
        balcony = model.balconies[str(k)]
        balcony.init_from_backbone(model.layers)
        if norm == "final":
            balcony.norm.copy_(model.norm)
        balcony.set_lens(w.to(balcony.norm.dtype), b.to(balcony.norm.dtype))
