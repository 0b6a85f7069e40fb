"""Where do the exit's missing facts live? A diagnostic, untrained, in-process.

Exit k skips backbone layers k..L-1. This probe runs the shipped exit-k balcony and, beside its MLP,
the MLPs (and/or the attention) of chosen skipped layers, each reading the balcony's own residual
stream through its own norm, scaled by alpha and added to the balcony's output. If the facts the exit
misses sit in those layers' weights, the transplant should lift the facts score even untrained; if
it does not, a wider balcony seeded from the skipped layers is not the lever.

    python bench/skip_probe.py --exit 22 --mlps 22-28 --alpha 1.0 --english 4

Scores both facts suites by log-likelihood of each choice after the question (lm-eval's
multiple-choice scoring, in-process rather than through the server, so figures compare variants
with each other, not with bench/facts_eval.py's) and the mean NLL on held-out English.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from balcony_runtime.loader import load_model
from balcony_runtime.training.dense_forward import backbone_pass, final_normed, lm_logits
from kernels import reference

TASKS = Path(__file__).parent / "tasks" / "balcony_facts"


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight, [T, H]: the kernels' torch reference."""
    return reference.rms_norm(x, weight, eps)[0]


def mlp(layer, x: torch.Tensor, eps: float) -> torch.Tensor:
    """layer's SwiGLU MLP on residual x [T, H], through layer's own post-attention norm."""
    return F.linear(reference.swiglu(rms(x, layer.post_attention_norm, eps), layer.gate_up_proj), layer.down_proj)


def attention(layer, x: torch.Tensor, attend, arch) -> torch.Tensor:
    """layer's attention on residual x [T, H], through its own input norm."""
    qkv = F.linear(rms(x, layer.input_norm, arch.rms_norm_eps), layer.qkv_proj)
    q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    out = attend(q.view(-1, arch.num_heads, arch.head_dim), k.view(-1, arch.num_kv_heads, arch.head_dim),
                 v.view(-1, arch.num_kv_heads, arch.head_dim))
    return F.linear(out.flatten(1), layer.o_proj)


def exit_logits(model, k: int, states, mlps: list[int], attns: list[int], alpha: float) -> torch.Tensor:
    """The exit-k balcony with the chosen skipped layers' MLPs / attention added beside its own."""
    arch, eps = model.arch, model.arch.rms_norm_eps
    balcony = model.balconies[str(k)]
    hidden, residual = states.at_exit[k]
    x = hidden + residual  # [T, H]
    if balcony.lens is not None:
        x = F.linear(x, balcony.lens.weight, balcony.lens.bias)
    layer = balcony.layer
    x_mid = x + attention(layer, x, states.attend, arch)
    extra_attn = sum((attention(model.layers[j], x, states.attend, arch) for j in attns), torch.zeros_like(x))
    x_mid = x_mid + alpha * extra_attn
    out = x_mid + mlp(layer, x_mid, eps)
    out = out + alpha * sum((mlp(model.layers[j], x_mid, eps) for j in mlps), torch.zeros_like(x))
    return lm_logits(model, rms(out, balcony.norm, eps))


def continuation_logprob(logits: torch.Tensor, ids: torch.Tensor, start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start; logits [T, V] for ids [T]."""
    logp = torch.log_softmax(logits[start - 1 : -1].float(), dim=-1)
    return float(logp.gather(1, ids[start:, None]).sum())


def parse_layers(spec: str) -> list[int]:
    if not spec:
        return []
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exit", type=int, default=22)
    ap.add_argument("--mlps", default="", help="skipped layers whose MLPs run beside the balcony's, e.g. 22-28")
    ap.add_argument("--attns", default="", help="skipped layers whose attention runs beside the balcony's")
    ap.add_argument("--alpha", type=float, action="append", help="scale(s) of the transplanted outputs")
    ap.add_argument("--adapters", default="default")
    ap.add_argument("--english", type=int, default=4, help="held-out English files scored (first 512 tokens each)")
    ap.add_argument("--english-dir", default="/tmp/english")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(adapters=args.adapters, dtype="float32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    k, mlps, attns = args.exit, parse_layers(args.mlps), parse_layers(args.attns)
    alphas = args.alpha or [1.0]
    variants = {"full": None, f"exit{k}": 0.0, **{f"exit{k}+a{a}": a for a in alphas if a}}

    def scores(ids: list[int]) -> dict[str, torch.Tensor]:
        t = torch.tensor([ids])
        states = backbone_pass(model, t, keep={k})
        out = {}
        for name, alpha in variants.items():
            if alpha is None:
                out[name] = lm_logits(model, final_normed(model, *states.final))
            else:
                out[name] = exit_logits(model, k, states, mlps if alpha else [], attns if alpha else [], alpha or 0.0)
        return out

    result = {"exit": k, "mlps": mlps, "attns": attns, "adapters": args.adapters}
    for suite in ("facts", "facts_more"):
        items = [json.loads(line) for line in (TASKS / f"{suite}.jsonl").read_text().splitlines()]
        right = {name: 0 for name in variants}
        for item in items:
            context = tok(item["question"], add_special_tokens=False)["input_ids"]
            lp = {name: [] for name in variants}
            for choice in item["choices"]:
                whole = tok(item["question"] + " " + choice, add_special_tokens=False)["input_ids"]
                ids = torch.tensor(whole)
                for name, logits in scores(whole).items():
                    lp[name].append(continuation_logprob(logits, ids, len(context)))
            for name in variants:
                right[name] += int(max(range(len(lp[name])), key=lp[name].__getitem__) == item["answer"])
        result[suite] = {name: right[name] / len(items) for name in variants}
        print(suite, {n: round(v, 3) for n, v in result[suite].items()}, flush=True)

    files = sorted(Path(args.english_dir).iterdir())[: args.english]
    nll = {name: [0.0, 0] for name in variants}
    for path in files:
        ids = tok(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"][:512]
        t = torch.tensor(ids)
        for name, logits in scores(ids).items():
            nll[name][0] -= continuation_logprob(logits, t, 1)
            nll[name][1] += len(ids) - 1
    ppl = {name: math.exp(total / n) for name, (total, n) in nll.items()}
    result["english_ppl_ratio"] = {name: ppl[name] / ppl["full"] for name in variants}
    print("english ratio", {n: round(v, 3) for n, v in result["english_ppl_ratio"].items()}, flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
