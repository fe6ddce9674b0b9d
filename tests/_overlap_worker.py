"""Run under torchrun (2 gloo processes): OverlappedGradientAverager against average_gradients.

Writes, from rank 0, a JSON line with the largest difference between the two ways of averaging,
how many buckets started during backward, and whether the means are the true means over ranks.
"""
import json
import sys

import torch
import torch.distributed as dist

from clipforge.distributed import OverlappedGradientAverager, average_gradients


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same weights on both ranks
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 8))
    unused = torch.nn.Parameter(torch.ones(3))  # never reached by backward: averaged as zeros
    params = list(model.parameters()) + [unused]
    inputs = torch.randn(4, 16, generator=torch.Generator().manual_seed(rank + 1))  # different per rank

    def backward():
        for p in params:
            p.grad = None
        model(inputs).square().sum().backward()

    backward()
    local = [None if p.grad is None else p.grad.clone() for p in params]
    average_gradients(params)
    expected = [p.grad.clone() for p in params]

    averager = OverlappedGradientAverager(params, bucket_bytes=1024)  # three buckets; the first waits for the unused one
    backward()
    started_in_backward = len(averager._launched)
    averager.finish()
    worst = max((p.grad - e).abs().max().item() for p, e in zip(params, expected))

    gathered = [None, None]
    dist.all_gather_object(gathered, local)
    true_mean = [sum(torch.zeros_like(p) if g[i] is None else g[i] for g in gathered) / 2 for i, p in enumerate(params)]
    mean_error = max((p.grad - m).abs().max().item() for p, m in zip(params, true_mean))

    averager.active = False  # inactive: backward leaves the local gradients alone
    backward()
    untouched = all(torch.equal(p.grad, l) for p, l in zip(params[:-1], local[:-1]))
    if rank == 0:
        with open(out_path, "w") as file:
            json.dump({"worst": worst, "buckets": len(averager.buckets), "started_in_backward": started_in_backward,
                       "mean_error": mean_error, "inactive_untouched": untouched}, file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
