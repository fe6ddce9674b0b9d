"""One training step, clipforge against open_clip, on the same weights and the same batch.

Each step is what the library's own training loop does. clipforge: ``contrastive_step`` (encoders,
tiled contrastive loss, backward), the gradient norm the loop logs, fused AdamW, the logit-scale
clamp. open_clip: ``model(images, texts)`` -> ``ClipLoss`` -> backward -> AdamW -> clamp, as
``open_clip_train``'s ``train_one_epoch`` does. The open_clip model is built from the clipforge
model's state dict (``build_model_from_openai_state_dict``), so both start from identical weights;
the first step's losses are printed side by side as the check.

The implementations run interleaved in one process (A, B, A, B, ...) after ``--warmup`` untimed
steps each (4: open_clip's step time falls by about a fifth over its first steps, as its own
training loop's log shows too; with one warm-up step the ratio was overstated);
samples/s is the median over rounds, and the ratio is the median of per-round ratios, so a load
change on a shared machine hits both sides of a pair alike. MFU counts the FLOPs each step runs
(``torch.utils.flop_counter``; clipforge's text trimmed, open_clip's at 77 tokens) against the machine's
measured peak: the median of large fp32 ``torch.mm`` calls with the same threads (CPU) or bf16 on
the GPU. Peak memory: a fresh child process per implementation runs two steps and reports its peak
RSS above what it held before the steps (CPU, ``/proc/self/clear_refs``) or
``torch.cuda.max_memory_allocated`` (GPU).

    PYTHONPATH=$PWD/src /work/peers/bin/python benchmarks/bench_train.py --model ViT-B/32 --threads 2
    PYTHONPATH=$PWD/src /work/peers/bin/python benchmarks/bench_train.py --model RN50 --threads 2
    PYTHONPATH=$PWD/src /work/peers/bin/python benchmarks/bench_train.py --model ViT-B/32 --patch-dropout 0.5 0.75
    # GPU: --device cuda --precision bf16 --batch 512
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch

# COCO-style captions (one sentence, 9-14 words): the lengths the text tower sees in practice.
CAPTIONS = [
    "A man riding a wave on top of a surfboard in the ocean.",
    "Two dogs playing with a frisbee on a grassy field near trees.",
    "A kitchen with white cabinets, a stove and a large window.",
    "A plate of food with broccoli, rice and grilled chicken on it.",
    "A red double decker bus driving down a busy city street.",
    "A young girl holding an umbrella while walking in the rain.",
    "A group of people standing around a table with laptops.",
    "A cat sleeping on a couch next to a remote control.",
    "An airplane flying over a city skyline on a clear day.",
    "A bowl of fruit with bananas, apples and oranges on a table.",
    "A baseball player swinging a bat at a ball during a game.",
    "A train traveling down the tracks past a small station.",
    "A woman cutting a large pizza on a wooden cutting board.",
    "A bathroom with a toilet, a sink and a mirror on the wall.",
    "A giraffe standing next to a tree in a grassy enclosure.",
    "A person skiing down a snowy slope under a blue sky.",
]


def _step_clipforge(model, optimizer, objective, images, tokens, autocast_dtype):
    from clipforge.loss import clamp_logit_scale_
    from clipforge.train.grad_cache import contrastive_step
    from clipforge.train.optim import gradient_norm_

    loss, _ = contrastive_step(model, images, tokens, lambda i, t: objective(i, t, model.logit_scale),
                               autocast_dtype=autocast_dtype)
    gradient_norm_([p for p in model.parameters() if p.requires_grad], None)  # the loop logs it
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clamp_logit_scale_(model.logit_scale)
    return float(loss.detach())


def _step_open_clip(model, optimizer, loss_fn, images, tokens, autocast_dtype):
    device = images.device
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(images, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return float(loss.detach())


def _build(impl: str, args, device):
    """(step function, its state) for ``impl``: clipforge[@dropout] or open_clip, same weights."""
    import clipforge
    from clipforge.train.config import OptimSection
    from clipforge.train.optim import build_optimizer

    torch.manual_seed(0)
    model = clipforge.create_model(args.model).float()
    if impl == "open_clip":
        from open_clip.loss import ClipLoss
        from open_clip.model import build_model_from_openai_state_dict

        peer = build_model_from_openai_state_dict(model.state_dict(), cast_dtype=None).float().to(device).train()
        peer.output_dict = True  # as open_clip_train creates it
        decay = [p for n, p in peer.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in peer.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        optimizer = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                                       {"params": decay, "weight_decay": 0.2}], lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
        return _step_open_clip, (peer, optimizer, ClipLoss())
    from clipforge.loss import Objective

    if "@" in impl:
        model.set_patch_dropout(float(impl.split("@")[1]))
    model = model.to(device).train()
    if impl.endswith("+channels_last"):
        model.visual.to(memory_format=torch.channels_last)
    if impl.endswith("+one_text_group"):
        model.pack_text, model.text_length_groups = False, 1  # the batch trimmed to its longest caption, padded
    if impl.endswith("+padded_text"):
        model.pack_text = False  # text padded in length groups, as before packing
    if impl.endswith("+compile"):
        from clipforge.train.main import _compile

        _compile(model)  # as run.compile=true does; the warm-up step below pays the compilation
    else:
        from clipforge.train.optim import sparse_token_gradients

        sparse_token_gradients(model)  # as the training loop does when not compiling
    objective = Objective("clip").to(device)
    optimizer = build_optimizer([model, objective], OptimSection(lr=1e-5))
    return _step_clipforge, (model, optimizer, objective)


def _web_captions(count: int) -> list[str]:
    """Captions with web-like lengths: most one sentence, some two to five (about 13 to 77 tokens)."""
    generator = torch.Generator().manual_seed(2)
    sentences = [1] * 10 + [2] * 3 + [3] * 2 + [5]  # how many sentences, drawn uniformly from this list
    out = []
    for i in range(count):
        n = sentences[int(torch.randint(len(sentences), (1,), generator=generator))]
        out.append(" ".join(CAPTIONS[(i + k) % len(CAPTIONS)] for k in range(n)))
    return out


def _batch(args, device, image_size: int, context_length: int):
    from clipforge.tokenizer import tokenize

    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, image_size, image_size, generator=generator).to(device)
    captions = ([CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)] if args.captions == "coco"
                else _web_captions(args.batch))
    return images, tokenize(captions, context_length=context_length, truncate=True).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _matmul_peak(device, dtype, size: int | None = None, repeats: int = 7) -> float:
    """The machine's measured matrix-multiply peak, FLOP/s: median of ``repeats`` size^3 products.

    On a GPU the products are 8192^3: an H200 runs a 4096^3 bf16 product in about 0.17 ms, to which
    the synchronisation around each timed call would add up to a tenth, lowering the peak (and
    raising every MFU).
    """
    size = size or (8192 if device.type == "cuda" else 4096)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times)


def _step_flops(step, state, images, tokens, autocast_dtype) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(*state, images, tokens, autocast_dtype)
    return float(counter.get_total_flops())


def _memory_child(impl: str, argv: list[str]) -> float:
    """Peak memory (MiB) of two steps of ``impl`` in a fresh process, above what it held before."""
    done = subprocess.run([sys.executable, __file__, *argv, "--memory-of", impl], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"memory probe of {impl} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def _rss_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _measure_memory(impl: str, args, device, autocast_dtype) -> float:
    import clipforge

    step, state = _build(impl, args, device)
    config = clipforge.get_config(args.model)
    images, tokens = _batch(args, device, config.vision.image_size, config.text.context_length)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(2):
            step(*state, images, tokens, autocast_dtype)
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    before = _rss_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # reset VmHWM to the current RSS
    for _ in range(2):
        step(*state, images, tokens, autocast_dtype)
    return _rss_mib("VmHWM") - before


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved A/B rounds after the warm-up steps")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps of each implementation first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--patch-dropout", type=float, nargs="*", default=[], help="extra clipforge rows at these shares")
    parser.add_argument("--channels-last", action="store_true", help="an extra clipforge row, image tower channels-last")
    parser.add_argument("--compile", action="store_true", help="an extra clipforge row, towers torch.compile'd")
    parser.add_argument("--one-text-group", action="store_true",
                        help="an extra clipforge row, text in one trimmed padded batch (neither groups nor packing)")
    parser.add_argument("--padded-text", action="store_true",
                        help="an extra clipforge row, training text padded in length groups instead of packed")
    parser.add_argument("--captions", default="coco", choices=["coco", "web"],
                        help="coco: one sentence each (13-17 tokens); web: 1-5 sentences (long-tailed lengths)")
    parser.add_argument("--no-open-clip", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None
    if args.memory_of:
        print(_measure_memory(args.memory_of, args, device, autocast_dtype))
        return

    impls = ["clipforge"] + [f"clipforge@{share}" for share in args.patch_dropout]
    impls += ["clipforge+channels_last"] if args.channels_last else []
    impls += ["clipforge+compile"] if args.compile else []
    impls += ["clipforge+one_text_group"] if args.one_text_group else []
    impls += ["clipforge+padded_text"] if args.padded_text else []
    impls += [] if args.no_open_clip else ["open_clip"]
    built = {impl: _build(impl, args, device) for impl in impls}
    model = built["clipforge"][1][0]
    images, tokens = _batch(args, device, model.config.vision.image_size, model.config.text.context_length)
    first_losses, warm_up_s = {}, {}
    for impl, (step, state) in built.items():
        start = time.perf_counter()
        first_losses[impl] = step(*state, images, tokens, autocast_dtype)
        warm_up_s[impl] = [round(time.perf_counter() - start, 1)]
    for _ in range(args.warmup - 1):  # step times settle over the first few steps (the allocator's pools)
        for impl, (step, state) in built.items():
            start = time.perf_counter()
            step(*state, images, tokens, autocast_dtype)
            warm_up_s[impl].append(round(time.perf_counter() - start, 1))
    print("first-step losses (same weights, same batch):", json.dumps(first_losses))
    print("warm-up step s (compilation included where compiled):", json.dumps(warm_up_s))
    flops = {impl: _step_flops(*built[impl], images, tokens, autocast_dtype)
             for impl in ("clipforge", "open_clip") if impl in built}  # FLOPs each step actually runs
    peak = _matmul_peak(device, torch.bfloat16 if autocast_dtype else torch.float32)

    seconds = {impl: [] for impl in impls}
    for _ in range(args.rounds):
        for impl, (step, state) in built.items():
            _sync(device)
            start = time.perf_counter()
            step(*state, images, tokens, autocast_dtype)
            _sync(device)
            seconds[impl].append(time.perf_counter() - start)
    peak_after = _matmul_peak(device, torch.bfloat16 if autocast_dtype else torch.float32)

    load = open("/proc/loadavg").read().split()[0] if device.type == "cpu" else "n/a"
    print(f"\n{args.model}, batch {args.batch}, {args.precision}, {device.type}, {args.threads} threads, "
          f"{args.rounds} rounds; load average {load}; matmul peak {peak / 1e9:.1f} GFLOP/s before, "
          f"{peak_after / 1e9:.1f} after; step GFLOP: "
          + ", ".join(f"{impl} {value / 1e9:.1f}" for impl, value in flops.items()) + "\n")
    print("| implementation | samples/s (median) | speed / clipforge's (median of rounds) | MFU |")
    print("|---|---|---|---|")
    base = seconds["clipforge"]
    for impl in impls:
        rate = args.batch / statistics.median(seconds[impl])
        ratio = statistics.median(b / s for b, s in zip(base, seconds[impl]))  # > 1: faster than clipforge
        mfu = f"{flops[impl] * rate / args.batch / max(peak, peak_after):.1%}" if impl in flops else ""
        print(f"| {impl} | {rate:.2f} | {ratio:.2f}x | {mfu} |", flush=True)
    if "open_clip" in seconds:
        speedup = statistics.median(o / c for o, c in zip(seconds["open_clip"], base))
        print(f"\nclipforge speed-up over open_clip (median of per-round ratios): {speedup:.2f}x", flush=True)
        # The most any implementation of clipforge's FLOPs could reach: all of them at the matmul peak.
        bound = statistics.median(seconds["open_clip"]) * max(peak, peak_after) / flops["clipforge"]
        print(f"ceiling: clipforge's FLOPs at 100% of the peak would be {bound:.2f}x open_clip", flush=True)
    if not args.no_memory:
        print("\npeak memory of two steps above the model, fresh process each (MiB): " + ", ".join(
            f"{impl} {_memory_child(impl, list(argv or sys.argv[1:])):.0f}" for impl in impls))


if __name__ == "__main__":
    main()
