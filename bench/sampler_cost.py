"""What sampling costs on the host per step, on real logits: greedy against temperature, top-k and
top-p, for a batch of rows (the default model's own next-token logits over an English passage).

    python bench/sampler_cost.py                  # 1 and 16 rows
    python bench/sampler_cost.py --rows 64 --repeats 50

Times the sampler's two device-side stages as a step runs them for unseeded sampled rows
(balcony_runtime/sampler.py: the filtered weights, then the inverse-CDF draw) and greedy's argmax,
on one torch thread: on a CPU this is arithmetic over the whole vocabulary for every row, which the
host-only step benchmark, whose stub logits are 512 wide and greedy, leaves out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from balcony_runtime.loader import load_model  # noqa: E402
from balcony_runtime.sampler import Sampler, _inverse_cdf_sample, _probability_weights_, row_argmax  # noqa: E402
from balcony_runtime.training.dense_forward import backbone_pass, final_normed, lm_logits  # noqa: E402

PASSAGE = ("The history of the city begins in the early middle ages, when a small market town grew around the "
           "river crossing. Over the centuries it became a centre of trade for wool and cloth, and its merchants "
           "built the churches and halls that still stand today. In the nineteenth century the railway brought "
           "mills and workers, and the old town was surrounded by streets of brick houses, schools and chapels.")
SETTINGS = (("greedy", None, 0, 1.0), ("temperature 0.8", 0.8, 0, 1.0), ("top-k 50", 0.8, 50, 1.0),
            ("top-p 0.95", 0.8, 0, 0.95), ("top-k 50, top-p 0.95", 0.8, 50, 0.95))


def passage_logits(rows: int, model: str = "smollm2-135m") -> torch.Tensor:
    """The full model's next-token logits at the passage's last ``rows`` positions: [rows, V] fp32."""
    loaded = load_model(model, adapters=None, dtype="float32")
    ids = torch.tensor([loaded.tokenizer.encode(PASSAGE)])
    if rows > ids.shape[1]:
        raise SystemExit(f"--rows {rows}: the passage has {ids.shape[1]} tokens")
    with torch.inference_mode():
        states = backbone_pass(loaded.model, ids, set())
        logits = lm_logits(loaded.model, final_normed(loaded.model, *states.final))
    return logits.reshape(-1, logits.shape[-1])[-rows:].float().contiguous()


def time_setting(logits: torch.Tensor, temperature, top_k: int, top_p: float, repeats: int
                 ) -> tuple[float, float, float]:
    """(median ms per step over the whole vocabulary, median ms per step of the sampler's CPU path,
    mean tokens kept per row). The CPU path draws a filtering row from its top candidates
    (balcony_runtime/candidate_sampling.py) and takes the whole-vocabulary path for the rest."""
    n = logits.shape[0]
    k, p = np.full(n, top_k, np.int64), np.full(n, top_p, np.float32)
    whole, cpu_path, kept = [], [], 0.0
    for _ in range(repeats):
        for path, times in (("whole", whole), ("cpu", cpu_path)):
            work = logits.clone()
            start = time.perf_counter()
            if temperature is None:
                row_argmax(work)
            elif path == "whole":
                work.div_(temperature)
                weights = _probability_weights_(work, k, p, False)
                _inverse_cdf_sample(weights, torch.rand(n, dtype=torch.float64))
            else:
                work.div_(temperature)
                Sampler._draw(work, k, p, torch.rand(n, dtype=torch.float64), sync_free=False)
            times.append(time.perf_counter() - start)
        kept = 1.0 if temperature is None else float((weights > 0).sum(dim=-1).float().mean())
    return 1e3 * statistics.median(whole), 1e3 * statistics.median(cpu_path), kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, action="append", help="rows per step (repeatable; default 1 and 16)")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per setting (median reported)")
    parser.add_argument("--model", default="smollm2-135m", help="a served model's name or a local directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = args.rows or [1, 16]
    logits = passage_logits(max(counts), args.model)
    print(f"the default model's logits over an English passage, vocabulary {logits.shape[1]}, torch "
          f"{torch.__version__}, one thread, median of {args.repeats}\n")
    print("| rows | sampling | whole vocabulary, ms per step | the sampler's CPU path, ms per step | tokens kept per row |")
    print("|---|---|---|---|---|")
    for rows in counts:
        for name, temperature, top_k, top_p in SETTINGS:
            whole, cpu_path, kept = time_setting(logits[-rows:].contiguous(), temperature, top_k, top_p, args.repeats)
            print(f"| {rows} | {name} | {whole:.2f} | {cpu_path:.2f} | {kept:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
