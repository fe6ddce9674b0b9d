"""retain_freed_memory: after it, a process that frees and re-allocates large blocks (as every
training step does with its activations) no longer page-faults them in again. Each case runs in
a fresh process, since the setting is process-wide."""
import subprocess
import sys
from pathlib import Path

import pytest

CYCLES = """
import resource, sys, torch
from clipforge.runtime import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def cycle():
    blocks = [torch.ones(2 << 20) for _ in range(20)]  # 20 blocks of 8 MiB, written
    del blocks
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def _huge_pages_always() -> bool:
    try:  # then the kernel backs big blocks with 2 MiB pages and faults are few either way
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or _huge_pages_always(),
                    reason="counts glibc's 4 KiB page faults")
def test_retained_memory_is_reused_without_page_faults():
    pages = 5 * 20 * (8 << 20) // 4096  # what the five cycles touch
    default, retained = _faults("default"), _faults("retain")
    # glibc gives the blocks back at least once in the five cycles (how often varies from process
    # to process with its heap layout: 43,000 to 205,000 faults here), and faults them in again
    assert default > 10 * retained
    assert retained < pages // 20  # here 2,048: one block's pages


def test_retain_freed_memory_is_a_no_op_off_linux(monkeypatch):
    from clipforge import runtime

    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime.retain_freed_memory() is False
