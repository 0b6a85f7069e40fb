"""Copy lens adapters with each balcony's final norm replaced (issue 12's norm comparison).

    python bench/lens_swap_norm.py IN_ADAPTERS OUT_ADAPTERS --norm exit    # layers[k].input_layernorm
    python bench/lens_swap_norm.py IN_ADAPTERS OUT_ADAPTERS --norm final   # the backbone's model.norm

Everything else (the copied last layer, the lens map, balcony.json) is kept; balcony.json's
training section records the swap.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from balcony_runtime.adapters import load_adapters, save_adapters
from balcony_runtime.loader import load_model
from balcony_runtime.weight_format import DTYPES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapters")
    ap.add_argument("output")
    ap.add_argument("--norm", choices=["exit", "final"], required=True)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    meta, tensors = load_adapters(Path(args.adapters))
    model = load_model(args.model, adapters=args.adapters, dtype="float32", device="cpu").model
    for k in meta.exits:
        source = model.layers[k].input_norm if args.norm == "exit" else model.norm
        tensors[k]["norm.weight"] = source.detach()
    meta.training = {**meta.training, "norm_swapped_to": args.norm, "norm_swap_from": str(args.adapters)}
    save_adapters(Path(args.output), meta, tensors, DTYPES[meta.dtype])


if __name__ == "__main__":
    main()
