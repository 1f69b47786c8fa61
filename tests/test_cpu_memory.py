"""The training's kept heap on the CPU (issue 17's CPU step): tensors freed in one step are reused by the next
without the kernel mapping and zeroing fresh pages, and the kept memory goes back to the system afterwards."""

import resource

import pytest
import torch

from lora_studio.cpu_memory import KeptHeap, glibc
from lora_studio.cpu_threads import CpuPolicy

pytestmark = pytest.mark.skipif(glibc() is None, reason="the kept heap is glibc's (Linux)")
BLOCK = 64 << 20  # 64 MiB: above the 32 MiB that glibc's sliding mmap threshold can reach, so it is always mmapped


def page_faults_of_steps(steps: int = 6) -> int:
    """Minor page faults while a 'step' allocates, writes and frees a 64 MiB tensor `steps` times."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        torch.empty(BLOCK // 4).fill_(1.0)  # fill_: the pages are touched, as a step's activations are
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def test_freed_tensors_keep_their_pages_only_while_kept():
    pages = BLOCK // resource.getpagesize()
    assert page_faults_of_steps() > 5 * pages  # glibc's default: every step maps and zeroes the block again
    heap = KeptHeap("cpu")
    try:
        assert heap.active
        # The first steps map new blocks: torch's aligned allocations leave small chunks between them until the
        # heap has room for the block (measured: 1 to 8 steps), as a training's first steps grow its heap.
        page_faults_of_steps(16)
        assert page_faults_of_steps() < pages  # later steps reuse it
        kept = resident_bytes()
    finally:
        heap.release()
    assert not heap.active
    assert resident_bytes() < kept - BLOCK  # the kept blocks went back to the system
    heap.release()  # twice is harmless


def test_only_a_cpu_training_keeps_memory_and_the_training_policy_gives_it_back():
    assert not KeptHeap("cuda").active  # a GPU's tensors are not glibc's
    threads = CpuPolicy("cpu")
    assert threads.heap.active
    threads.restore()
    assert not threads.heap.active
    assert not CpuPolicy("cuda").heap.active
