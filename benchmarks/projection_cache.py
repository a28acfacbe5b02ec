"""One projection pass with and without RademacherProjector's cache of the generator's bytes.

    PYTHONPATH=src python benchmarks/projection_cache.py            # CPU, one thread
    PYTHONPATH=src python benchmarks/projection_cache.py --device cuda --dim 20971520 --rows 256

Three passes of project((rows, D)) each: the first fills the cache, the later ones only expand
the kept bytes into signs. Prints seconds per pass and the ratio of the later passes. Take the
timing with nothing else running. benchmarks/device_check.py measures the same on a GPU inside a
whole stage 2 (its `projected_cached` row).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ntkselect.grads.projection import RademacherProjector, cache_bytes_per_block


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=2_442_240 // 8, help="D (default: an eighth of SmolLM2-135M's LoRA r = 8 on all linear layers)")
    ap.add_argument("--proj-dim", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    G = torch.randn(args.rows, args.dim, device=dev)  # (B, D)
    res = {}
    for name, cache in (("plain", 0), ("cached", 1 << 62)):
        P = RademacherProjector(args.dim, args.proj_dim, seed=0, device=dev, cache_bytes=cache)
        times = []
        for _ in range(3):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            P.project(G)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t)
        res[name] = times
        print(f"{name:>6}: passes {', '.join(f'{x:.2f} s' for x in times)}", flush=True)
    later = lambda k: sum(res[k][1:]) / 2  # noqa: E731
    kept = P.n_blocks * cache_bytes_per_block(args.proj_dim)
    print(f"later passes: plain / cached = {later('plain') / later('cached'):.2f}x; the cache holds {kept / 2**20:,.0f} MiB")
    print(json.dumps({"args": vars(args), "seconds": res, "cache_bytes": kept}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
