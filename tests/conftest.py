"""Shared pytest set-up: small thread count so parallel engineers and CI share 2 cores fairly."""
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Child processes (torchrun ranks, CLI runs) print every thread's Python stack if they die of a
# signal: one torchrun rank once aborted in C++ ("terminate called without an active exception")
# with no traceback at all, in 1 of about 70 runs, and could not be reproduced.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when CUDA is unavailable."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The demo's source cache (apt/npm packages); skips, naming the install command, when missing."""
    from clipforge.demo.sources import default_cache_dir, install_commands, missing_packages

    cache = default_cache_dir()
    missing = missing_packages(cache)
    if missing:
        pytest.skip(f"demo sources not installed ({', '.join(missing)}); run: "
                    f"{' && '.join(install_commands(missing, cache))}")
    return cache
