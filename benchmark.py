"""Times a MOKD step against independent training of the same two models, on random tensors of the real crop shapes.

    python benchmark.py --arch-a resnet18 --arch-b vit_tiny --patch-size 4 --global-crop-size 32 \
        --local-crop-size 16 --local-crops-number 6 --batch-size-per-gpu 256 --out-dim 4096   # CIFAR shapes
    python benchmark.py ... --data-path DIR      # also times the DataLoader alone on DIR

Every mokd.py flag applies (the demo's settings without --data-path), plus --benchmark-steps. Prints one line per
variant and ends with one JSON object: images/s, ms per step, peak memory, GFLOP and aten operations per step,
and the MOKD / independent ratios of time, FLOPs and operations.
"""
import argparse
import json
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # counts operations
from torch.utils.flop_counter import FlopCounterMode

from mokd import (MOKDError, Run, build_schedules, check_config, image_stats, make_loader, normalise, parse_config,
                  peak_memory_mb, positive_int)


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside the block (views included)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def benchmark(cfg, device):
    """Images/s, ms/step and peak memory of (a) full MOKD and (b) independent DINO training of the two models
    (lambda 0, no T-heads, no search) on random tensors of the real crop shapes; plus a FLOP-count ratio and,
    with --data-path, the DataLoader's own images/s."""
    B, n, G, l = cfg["batch_size_per_gpu"], cfg["local_crops_number"], cfg["global_crop_size"], cfg["local_crop_size"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    crops = [torch.randn(B, 3, G, G, generator=gen) for _ in range(2)]
    crops += [torch.randn(B, 3, l, l, generator=gen) for _ in range(n)]
    crops = [c.to(device) for c in crops]
    S = build_schedules(cfg, 1000, 1)
    ep = min(cfg["freeze_last_layer"], cfg["epochs"] - 1)  # past the frozen-last-layer epoch where possible
    results = {}
    for name, thead in (("independent", False), ("mokd", True)):
        c = dict(cfg) if thead else {**cfg, "lam_a": 0.0, "lam_b": 0.0}
        torch.manual_seed(cfg["seed"])
        run = Run(c, device, 1, with_thead=thead)
        with FlopCounterMode(display=False) as fc:
            run.step(crops, ep, 0, S)
        with OpCounter() as ops:  # a second step: the first also creates the optimiser state
            run.step(crops, ep, 0, S)
        for i in range(3):  # warm-up
            run.step(crops, ep, i, S)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for i in range(cfg["benchmark_steps"]):
            v = run.step(crops, ep, i, S)
        v.tolist()  # wait for the device
        dt = (time.perf_counter() - t0) / cfg["benchmark_steps"]
        results[name] = {"images_per_s": round(B / dt, 2), "ms_per_step": round(1000 * dt, 1),
                         "peak_mem_mb": peak_memory_mb(device), "gflop_per_step": round(fc.get_total_flops() / 1e9, 2),
                         "ops_per_step": ops.n}
        print(f"{name:12s} {results[name]}", flush=True)
        del run
    if cfg["data_path"]:
        results["loader"] = loader_throughput(cfg, device)
        print(f"{'loader':12s} {results['loader']}", flush=True)
    ind, mk = results["independent"], results["mokd"]
    keys = ("arch_a", "arch_b", "patch_size", "global_crop_size", "local_crop_size", "local_crops_number",
            "batch_size_per_gpu", "out_dim", "precision", "compile")
    on_gpu = device.type == "cuda"
    summary = {"benchmark": {k: cfg[k] for k in keys},
               "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu x{torch.get_num_threads()}",
               **results, "time_ratio": round(mk["ms_per_step"] / ind["ms_per_step"], 3),
               "flop_ratio": round(mk["gflop_per_step"] / ind["gflop_per_step"], 3),
               "ops_ratio": round(mk["ops_per_step"] / ind["ops_per_step"], 3)}
    print(json.dumps(summary), flush=True)
    return summary


def loader_throughput(cfg, device):
    """Images/s the DataLoader delivers alone (read, multi-crop augmentation, collation, copy to the device and
    normalisation) after two batches of start-up: training is loader-bound where this is below the step's images/s."""
    _, sampler, loader = make_loader(cfg, 0, 1, device)
    stats = image_stats(device)
    n = min(cfg["benchmark_steps"], sampler.steps - 2)
    if n < 1:
        raise MOKDError(f"benchmark.py times the loader on {cfg['data_path']!r}: it needs at least 3 batches of "
                        f"--batch-size-per-gpu {cfg['batch_size_per_gpu']}, the folder gives {sampler.steps}")
    batches = iter(loader)
    for _ in range(2):
        next(batches)
    t0 = time.perf_counter()
    for _ in range(n):
        crops = normalise(next(batches), *stats)
    crops[0].sum().item()  # wait for the device
    dt = (time.perf_counter() - t0) / n
    return {"images_per_s": round(cfg["batch_size_per_gpu"] / dt, 2), "ms_per_batch": round(1000 * dt, 1),
            "num_workers": cfg["num_workers"]}


def main(argv=None):
    own = argparse.ArgumentParser("benchmark", add_help=False, allow_abbrev=False)
    own.add_argument("--benchmark-steps", type=positive_int, default=10, help="timed optimiser steps per variant")
    args, rest = own.parse_known_args(argv)
    cfg = {**parse_config(rest), "benchmark_steps": args.benchmark_steps}  # every other flag is mokd.py's
    try:
        check_config(cfg, 1)
        return benchmark(cfg, torch.device(cfg["device"]))
    except MOKDError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
