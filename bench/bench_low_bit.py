"""What ``draft_weights="auto"`` measures (clasp_ext.decoding.low_bit.measure_kinds): one token
through the linears of the first 512 MiB of decoder layers on the model's weights, int8 and int4
copies, interleaved; prints the medians, their ratios and the choice (``choose_kind``),
``--repeats`` times.

    python bench/bench_low_bit.py --model qwen2.5-coder-1.5b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_step_costs import add_model_arguments, load_model  # noqa: E402

from clasp_ext.decoding import low_bit  # noqa: E402
from clasp_ext.timing import cpu_description  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3, help="how many times to measure")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args, "cpu")
    print(f"{cpu_description()}, {args.threads} threads, torch {torch.__version__}, {args.dtype}")
    for _ in range(args.repeats):
        t = low_bit.measure_kinds(model.model.layers)
        if not t:
            print("layers too small to measure: auto keeps the model's weights")
            break
        cells = ", ".join(
            f"{k or 'original'} {v * 1e3:.1f} ms ({v / t[None]:.2f}x)" for k, v in t.items()
        )
        print(f"{cells}; auto chooses {low_bit.choose_kind(t)}")


if __name__ == "__main__":
    main()
