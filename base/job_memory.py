"""The peak memory of one job alone: the host's resident set (the kernel's peak counter reset when the job
starts, or sampled while it runs) and, on a CUDA device, the GPU memory PyTorch allocated.

A process's lifetime peak (getrusage) would give every later job of a sweep the largest earlier job's peak.
"""
import os
import re
import resource
import sys
import threading

import torch

SAMPLE_S = 0.05  # sampling interval where the peak counter cannot be reset; a job lasts seconds at least
PAGE_BYTES = os.sysconf('SC_PAGE_SIZE') if hasattr(os, 'sysconf') else 4096


def reset_peak_counter():
    """Resets the kernel's peak resident set of this process (VmHWM) to its current size; False where the
    kernel or the container does not allow it."""
    try:
        with open('/proc/self/clear_refs', 'w') as handle:
            handle.write('5')
        return peak_counter_bytes() is not None
    except OSError:
        return False


def peak_counter_bytes():
    try:
        with open('/proc/self/status') as handle:
            match = re.search(r'^VmHWM:\s+(\d+) kB', handle.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def resident_bytes():
    """The resident set of this process now, or None without /proc."""
    try:
        with open('/proc/self/statm') as handle:
            return int(handle.read().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


def process_peak_bytes():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024  # macOS reports bytes, Linux KiB


class JobMemory:
    """`with JobMemory(device) as memory:` around a job; then memory.figures() gives its results.json keys:
    job_peak_rss_gib (or process_peak_rss_gib where neither /proc way works, e.g. macOS) and, on CUDA,
    job_peak_gpu_gib."""

    def __init__(self, device):
        self.device = device
        self.cuda = str(device).startswith('cuda') and torch.cuda.is_available()
        self.how, self.peak = None, 0
        self.stop, self.sampler = threading.Event(), None

    def __enter__(self):
        if self.cuda:
            try:
                torch.cuda.reset_peak_memory_stats(self.device)
            except (RuntimeError, ValueError, AssertionError):  # not a device of this process: the job says so
                self.cuda = False
        if reset_peak_counter():
            self.how = 'counter'
        elif resident_bytes() is not None:
            self.how, self.peak = 'sampled', resident_bytes()
            self.sampler = threading.Thread(target=self.sample, name='job-memory', daemon=True)
            self.sampler.start()
        return self

    def sample(self):
        while not self.stop.wait(SAMPLE_S):
            self.peak = max(self.peak, resident_bytes() or 0)

    def __exit__(self, *exception):
        if self.how == 'counter':
            self.peak = peak_counter_bytes() or 0
        elif self.how == 'sampled':
            self.stop.set()
            self.sampler.join()
            self.peak = max(self.peak, resident_bytes() or 0)
        else:
            self.peak = process_peak_bytes()
        return False

    def figures(self):
        """{results.json key: GiB} of the job measured."""
        key = 'job_peak_rss_gib' if self.how else 'process_peak_rss_gib'
        figures = {key: round(self.peak / 2 ** 30, 2)}
        if self.cuda:
            figures['job_peak_gpu_gib'] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 2)
        return figures
