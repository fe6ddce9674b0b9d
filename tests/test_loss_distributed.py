"""Two gloo processes with half the batch each compute the one-process loss and gradients.

Convention under test (clipforge.loss docstring): every rank returns the global loss, and the
mean over ranks of its gradients (what DDP or ``average_gradients`` computes) is the
single-process gradient; so each rank's embedding gradient is world_size x its rows' share.
"""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD_SIZE = 2


def _assert_rel_close(actual, expected, rel=1e-5, what=""):
    error = (actual - expected).abs().max().item()
    size = expected.abs().max().item()
    assert error <= rel * max(size, 1e-6), f"{what}: max abs error {error:.3g}, max |expected| {size:.3g}"


def _mean_over_ranks(tensor):
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / dist.get_world_size()


def _check_losses(rank: int) -> None:
    from clipforge.loss import contrastive_loss, sigmoid_loss

    n, dim = 7, 16  # per rank; the global batch is 14 pairs, tile 3 splits it unevenly
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(WORLD_SIZE * n, dim, generator=generator)
    text = image + 0.9 * torch.randn(WORLD_SIZE * n, dim, generator=generator)
    mine = slice(rank * n, (rank + 1) * n)
    losses = {
        "clip": lambda i, t, params, gather: contrastive_loss(i, t, params[0], tile_size=3, gather=gather),
        "siglip": lambda i, t, params, gather: sigmoid_loss(i, t, *params, tile_size=3, gather=gather),
    }
    for name, loss_fn in losses.items():
        params = [torch.tensor(2.3, requires_grad=True), torch.tensor(-4.0, requires_grad=True)]
        params = params[:1] if name == "clip" else params
        full = [image.clone().requires_grad_(), text.clone().requires_grad_(), *[p.detach().clone().requires_grad_() for p in params]]
        expected = loss_fn(full[0], full[1], full[2:], False)
        expected.backward()

        local_image = image[mine].clone().requires_grad_()
        local_text = text[mine].clone().requires_grad_()
        loss = loss_fn(local_image, local_text, params, True)
        loss.backward()
        _assert_rel_close(loss.detach(), expected.detach(), what=f"{name} loss")
        _assert_rel_close(local_image.grad / WORLD_SIZE, full[0].grad[mine], what=f"{name} image grad")
        _assert_rel_close(local_text.grad / WORLD_SIZE, full[1].grad[mine], what=f"{name} text grad")
        for param, reference in zip(params, full[2:]):
            _assert_rel_close(_mean_over_ranks(param.grad), reference.grad, what=f"{name} scalar grad")


def _check_contrastive_step(rank: int) -> None:
    import clipforge
    from clipforge.distributed import average_gradients
    from clipforge.loss import contrastive_loss
    from clipforge.train.grad_cache import contrastive_step

    torch.manual_seed(0)  # same initial weights on both ranks
    model = clipforge.create_model("tiny-vit")
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 64, 64, generator=generator)
    tokens = torch.randint(1, 40000, (8, 10), generator=generator)
    tokens[:, -1] = 49407  # end of text
    mine = slice(rank * 4, (rank + 1) * 4)

    full_loss = contrastive_loss(reference.encode_image(images), reference.encode_text(tokens), reference.logit_scale, gather=False)
    full_loss.backward()
    loss, _ = contrastive_step(
        model, images[mine], tokens[mine],
        lambda i, t: contrastive_loss(i, t, model.logit_scale), chunk_size=3,
    )
    average_gradients(model.parameters())
    _assert_rel_close(loss, full_loss.detach(), what="step loss")
    expected = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        _assert_rel_close(param.grad, expected[name].grad, what=f"grad of {name}")


def _check_unequal_batches_raise(rank: int) -> None:
    from clipforge.loss import contrastive_loss

    rows = 3 + rank
    with pytest.raises(ValueError, match=r"\[\(3, 4\), \(4, 4\)\]"):
        contrastive_loss(torch.randn(rows, 4), torch.randn(rows, 4), 1.0)


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        _check_losses(rank)
        _check_contrastive_step(rank)
        _check_unequal_batches_raise(rank)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_concatenated_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))  # undone after the test
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD_SIZE, join=True)
