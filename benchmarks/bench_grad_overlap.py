"""Gradient all-reduce overlapped with backward, against one all-reduce after backward (2+ processes).

Each process (gloo on the CPU, NCCL on GPUs) builds the same model and runs training steps as the
loop does: ``contrastive_step`` over its share of the global batch (features gathered by the
loss), then the gradient average, then fused AdamW. Two ways of averaging alternate step by step
in the same processes, so a load change hits both alike:

- ``overlapped``: ``OverlappedGradientAverager`` (buckets of 25 MiB launched asynchronously from
  gradient hooks while backward goes on, as DDP does; the training loop's default);
- ``after``: ``average_gradients`` once backward is done (what the loop does for chunked steps).

After each pair rank 0 checks that both left the same gradients (the first pair starts from the
same weights; later pairs diverge only by one optimizer step each, so only the first is
compared). Reports the median step time of each, the median of per-pair ratios, and the time of
the all-reduce alone (the most that overlapping can hide).

    PYTHONPATH=$PWD/src python benchmarks/bench_grad_overlap.py --model ViT-B/32 --batch 16 --rounds 5
    PYTHONPATH=$PWD/src python benchmarks/bench_grad_overlap.py --model demo-vit --batch 64 --rounds 9
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, args, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size)
    import clipforge
    from clipforge.distributed import OverlappedGradientAverager, average_gradients
    from clipforge.loss import Objective
    from clipforge.train.config import OptimSection
    from clipforge.train.grad_cache import contrastive_step
    from clipforge.train.optim import build_optimizer

    torch.manual_seed(0)
    model = clipforge.create_model(args.model).float().train()
    objective = Objective("clip")
    params = [p for p in [*model.parameters(), *objective.parameters()] if p.requires_grad]
    optimizer = build_optimizer([model, objective], OptimSection(lr=1e-5))
    averager = OverlappedGradientAverager(params)
    generator = torch.Generator().manual_seed(1 + rank)  # each rank its own pairs
    size = model.config.vision.image_size
    images = torch.randn(args.batch, 3, size, size, generator=generator)
    tokens = torch.randint(1, 40000, (args.batch, 16), generator=generator)
    tokens[:, 0], tokens[:, -1] = 49406, 49407  # start and end of text

    def step(overlapped: bool) -> tuple[float, list[torch.Tensor]]:
        averager.active = overlapped
        dist.barrier()
        start = time.perf_counter()
        contrastive_step(model, images, tokens, lambda i, t: objective(i, t, model.logit_scale))
        if overlapped:
            averager.finish()
        else:
            average_gradients(params)
        grads = [p.grad.clone() for p in params] if check else []
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, grads

    seconds = {"overlapped": [], "after": []}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    for round_ in range(args.rounds + 1):  # round 0 is the warm-up
        check = round_ == 0
        if check:
            taken, after = step(False)
            model.load_state_dict(state)  # the same starting weights for the overlapped step
            optimizer.load_state_dict(opt_state)
            _, overlapped = step(True)
            worst = max(float((a - b).abs().max()) for a, b in zip(after, overlapped))
            if rank == 0:
                results["max_grad_difference"] = worst
            continue
        for way in (("after", "overlapped") if round_ % 2 else ("overlapped", "after")):
            taken, _ = step(way == "overlapped")
            seconds[way].append(taken)
    reduce_only = []  # the all-reduce alone: the most that overlapping can hide
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        dist.barrier()
        start = time.perf_counter()
        average_gradients(params)
        reduce_only.append(time.perf_counter() - start)
    if rank == 0:
        results.update(seconds, reduce_only=reduce_only)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--batch", type=int, default=16, help="pairs per process")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(args, _free_port(), results), nprocs=args.world_size, join=True)
        results = dict(results)
    overlapped, after = results["overlapped"], results["after"]
    ratio = statistics.median(a / o for a, o in zip(after, overlapped))
    print(f"{args.model}, {args.world_size} processes x {args.batch} pairs, {args.threads} thread(s) each, gloo, "
          f"{args.rounds} rounds; load average {open('/proc/loadavg').read().split()[0]}")
    print(f"first step: largest gradient difference between the two ways {results['max_grad_difference']:.2e}\n")
    print("| gradient average | step s (median) |\n|---|---|")
    print(f"| after backward, one pass | {statistics.median(after):.2f} |")
    print(f"| overlapped with backward | {statistics.median(overlapped):.2f} |")
    print(f"| (the all-reduce alone, after backward) | {statistics.median(results['reduce_only']):.2f} |")
    print(f"\noverlapped speed-up (median of per-round ratios): {ratio:.2f}x")


if __name__ == "__main__":
    main()
