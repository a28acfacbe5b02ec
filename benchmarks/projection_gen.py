"""Projection-block generation, side by side: numpy's C Philox (the CPU route) against the same
stream made with torch int64 ops (the device route), on the CPU and, if there is one, on CUDA.

Each rate is the median of ``--repeats`` passes over ``--blocks`` blocks of a p-column R, in
signs per second (CUDA timed after a warm-up pass, with synchronisation). The last line is JSON.

    python benchmarks/projection_gen.py --proj-dim 8192 --blocks 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ntkselect.grads.projection import BLOCK_ROWS, RademacherProjector, _numpy_signs, _torch_signs


def _rate(make, device: torch.device, blocks: int, group: int, p: int, dtype: torch.dtype, repeats: int) -> float:
    """Signs per second making ``blocks`` blocks, ``group`` per call."""

    def one_pass():
        for first in range(0, blocks, group):
            make(0, first, min(group, blocks - first), p, dtype, device)
        if device.type == "cuda":
            torch.cuda.synchronize()

    one_pass()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t)
    return blocks * BLOCK_ROWS * p / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proj-dim", type=int, default=8192)
    ap.add_argument("--blocks", type=int, default=8, help="blocks per pass on the CPU")
    ap.add_argument("--cuda-blocks", type=int, default=512, help="blocks per pass on CUDA")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    p, cpu = args.proj_dim, torch.device("cpu")
    out: dict = {"proj_dim": p, "block_rows": BLOCK_ROWS, "cpu_threads": torch.get_num_threads(), "signs_per_s": {}}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).replace("torch.", "")
        r = out["signs_per_s"]
        r[f"cpu_numpy_{name}"] = _rate(_numpy_signs, cpu, args.blocks, 1, p, dtype, args.repeats)
        r[f"cpu_torch_{name}"] = _rate(_torch_signs, cpu, args.blocks, 1, p, dtype, args.repeats)
        if torch.cuda.is_available():
            dev = torch.device("cuda")
            group = RademacherProjector(args.cuda_blocks * BLOCK_ROWS, p, device=dev).group(dtype)
            r[f"cuda_torch_{name}"] = _rate(_torch_signs, dev, args.cuda_blocks, group, p, dtype, args.repeats)
            out[f"cuda_group_blocks_{name}"] = group
        print(f"{name}: " + ", ".join(f"{k} {v / 1e6:.0f} M/s" for k, v in r.items() if k.endswith(name)), flush=True)
    out["cpu_torch_over_numpy"] = {n: out["signs_per_s"][f"cpu_torch_{n}"] / out["signs_per_s"][f"cpu_numpy_{n}"] for n in ("bfloat16", "float32")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
