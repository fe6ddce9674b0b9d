"""Many epoch boundaries with loader workers: each epoch forks its own workers, and neither one
process nor two gloo processes hang at a boundary, and the batches match loading without workers.

Why fork at a boundary is a hazard: a forked worker inherits every lock another thread held at the
fork. CPython 3.11.7 hangs such a child in ``PyOS_AfterFork_Child`` when a native thread was
creating a Python thread state (gh-112275). The loader joins the last epoch's queue-feeder threads
before forking (``_let_ending_queue_threads_finish``); the first test pins that down.
"""
import functools
import json
import os
import subprocess
import textwrap
import threading
from pathlib import Path

import pytest

from clipforge.data import make_train_loader, open_dataset
from clipforge.tokenizer import tokenize
from clipforge.transforms import image_transform

from _batch_digest import batch_digest
from _data_helpers import make_pairs
from _torchrun import failure, torchrun

SAMPLES, BATCH = 16, 8  # two batches an epoch: the boundaries come fast
_threads_at_fork: list[list[str]] | None = None  # set to a list while a test records forks


def _record_threads_before_fork() -> None:
    if _threads_at_fork is not None:
        _threads_at_fork.append([t.name for t in threading.enumerate() if t.is_alive()])


os.register_at_fork(before=_record_threads_before_fork)


@pytest.fixture(scope="module")
def caption_file(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("epochs"), SAMPLES)[0]


def test_no_feeder_thread_of_an_earlier_epoch_is_alive_when_the_next_epoch_forks(caption_file):
    global _threads_at_fork
    dataset = open_dataset(caption_file)
    preprocess, tokenizer = image_transform(32, train=True), functools.partial(tokenize, truncate=True)
    epochs = range(12)
    _threads_at_fork = []
    try:
        with_workers = [batch_digest(make_train_loader(dataset, preprocess, tokenizer, BATCH, epoch=e, num_workers=2))
                        for e in epochs]
        forks = _threads_at_fork
    finally:
        _threads_at_fork = None
    in_process = [batch_digest(make_train_loader(dataset, preprocess, tokenizer, BATCH, epoch=e)) for e in epochs]
    assert with_workers == in_process
    assert len(set(in_process)) == len(epochs)  # each epoch has its own order and augmentation
    assert len(forks) == 2 * len(epochs)
    assert not [names for names in forks if "QueueFeederThread" in names]


_RANK_SCRIPT = textwrap.dedent("""
    import faulthandler, functools, json, sys
    import torch.distributed as dist
    sys.path.insert(0, %r)  # the tests folder, for the shared digest
    from _batch_digest import batch_digest as digest
    from clipforge.data import make_train_loader, open_dataset
    from clipforge.tokenizer import tokenize
    from clipforge.transforms import image_transform

    caption_file, epochs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    faulthandler.dump_traceback_later(float(sys.argv[4]), exit=True)  # a hang prints this rank's stack
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dataset = open_dataset(caption_file)
    preprocess, tokenizer = image_transform(32, train=True), functools.partial(tokenize, truncate=True)
    digests = {}
    for workers in (1, 0):
        per_epoch = []
        for epoch in range(epochs):
            batches = []
            for batch in make_train_loader(dataset, preprocess, tokenizer, %d // world, epoch=epoch,
                                           rank=rank, world_size=world, num_workers=workers):
                dist.all_reduce(batch.images.sum().reshape(1))  # gloo's threads at work between forks
                batches.append(batch)
            per_epoch.append(digest(batches))
        digests[workers] = per_epoch
    dist.barrier()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(digests, f)
    dist.destroy_process_group()
""" % (str(Path(__file__).parent), BATCH))


@pytest.mark.distributed
def test_two_processes_cross_many_epoch_boundaries_with_workers_without_hanging(caption_file, tmp_path):
    epochs, watchdog_s = 40, 90  # about 20 s on two shared cores
    script, out = tmp_path / "rank.py", tmp_path / "digests"
    script.write_text(_RANK_SCRIPT)
    try:
        done = torchrun([str(script), str(caption_file), str(epochs), str(out), str(watchdog_s)],
                        tmp_path / "scratch", timeout=watchdog_s + 30)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"2-process run hung at an epoch boundary: {(err.stderr or b'')[-3000:]!r}")
    assert done.returncode == 0, failure(done)
    for rank in range(2):
        digests = json.loads(Path(f"{out}.{rank}").read_text())
        assert digests["1"] == digests["0"], f"rank {rank}: batches with a worker differ from in-process ones"
        assert len(set(digests["0"])) == epochs
