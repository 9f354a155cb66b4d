"""The benchmark scripts still run against the code they measure: each imports and answers --help, and the
ones that need no trained model or real data run on tiny inputs and print their figures."""
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

BENCHMARKS = sorted(glob.glob(os.path.join(REPO_ROOT, 'benchmarks', '*.py')))


def benchmark(name, *args):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'benchmarks', name), *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)


@pytest.mark.parametrize('path', BENCHMARKS, ids=os.path.basename)
def test_every_benchmark_imports_and_answers_help(path):
    result = benchmark(os.path.basename(path), '--help')
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith('usage:')


def test_pixel_metrics_memory_prints_the_same_metrics_binned_and_exact():
    result = benchmark('pixel_metrics_memory.py', '--mode', 'both', '--n_images', '4', '--map_size', '32',
                       '--mask_size', '64')
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {line.split(':')[0]: line for line in result.stdout.splitlines() if re.match(r'(binned|exact):', line)}
    assert set(lines) == {'binned', 'exact'}
    for line in lines.values():
        assert '4 maps of 32^2, masks of 64^2' in line and 'peak traced' in line

    binned = re.findall(r'(AUROC|AUPRO) (\d\.\d+) \(\+-([\d.e-]+)\)', lines['binned'])
    exact = dict(re.findall(r'(AUROC|AUPRO) (\d\.\d+)', lines['exact']))
    assert [name for name, _, _ in binned] == ['AUROC', 'AUPRO'] and set(exact) == {'AUROC', 'AUPRO'}
    for name, value, bound in binned:  # the binned metrics lie within their printed bounds of the exact ones
        assert abs(float(value) - float(exact[name])) <= float(bound) + 1e-6


def test_views_benchmark_prints_both_backends(official_tree):
    result = benchmark('views.py', '--dataset_path', str(official_tree), '--class_name', 'widget', '--repeats', '1',
                       '--test_images', '1')
    assert result.returncode == 0, result.stderr[-2000:]
    rates = re.findall(r'^(training views|test views)\s+(pil|tensor)\s+([\d.]+) views/s', result.stdout, re.M)
    assert sorted((label, backend) for label, backend, _ in rates) == [
        ('test views', 'pil'), ('test views', 'tensor'), ('training views', 'pil'), ('training views', 'tensor')]
    assert all(float(rate) > 0 for _, _, rate in rates)
