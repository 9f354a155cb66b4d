"""benchmarks/parity.py: the rule's verdict, and a real sweep of tiny runs through main.py, two at once."""
import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, 'benchmarks'))

from parity import read_entry, verdict  # noqa: E402

TINY = ['--img_size', '64', '--n_scales', '1', '--n_coupling_blocks', '2', '--fc_internal', '32',
        '--n_transforms', '2', '--n_transforms_test', '2', '--batch_size', '4', '--pretrained', 'false',
        '--device', 'cpu', '--feature_cache', 'false']


@pytest.mark.parametrize('differences, baseline, expected', [
    ([0.010, 0.020, 0.015], [0.90, 0.91, 0.905], '+'),   # all up, mean 0.015 > spread 0.005
    ([-0.010, -0.020, -0.015], [0.90, 0.91, 0.905], '-'),
    ([0.010, -0.020, 0.015], [0.90, 0.91, 0.905], 'none'),  # mixed signs
    ([0.001, 0.002, 0.001], [0.90, 0.91, 0.905], 'none'),   # same sign, within the spread
    ([0.010], [0.90], 'n/a (1 seed)'),
])
def test_verdict_needs_one_sign_and_a_mean_beyond_the_spread(differences, baseline, expected):
    assert verdict(differences, baseline) == expected


def parity(args, tmp_path):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'benchmarks', 'parity.py'), *args],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=600)


def test_parity_runs_modes_and_seeds_at_once_and_reports_pairs(official_tree, tmp_path):
    out = tmp_path / 'parity'
    result = parity(['--modes', 'online', 'official_test_views', '--seeds', '0', '1', '--meta_epochs', '2',
                     '--sub_epochs', '1', '--jobs', '2', '--dataset_path', str(official_tree), '--class_name',
                     'widget', '--out', str(out), '--', *TINY], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    table = (out / 'parity.md').read_text()
    assert '| online - official_test_views | 2 |' in table
    assert table.count('| online seed ') == 2 and table.count('| official_test_views seed ') == 2
    assert (out / 'parity_curves.png').stat().st_size > 0
    with open(out / 'official_test_views_seed1' / 'results.json') as handle:
        results = json.load(handle)
    entry = results['classes'][0]
    assert len(entry['auroc']) == 2 and entry['seed'] == 1
    assert results['config']['cache_test_features'] is False and results['config']['img_size'] == 64
    assert not any(name.endswith('.pt') for name in os.listdir(out / 'online_seed0'))  # no checkpoint


def test_parity_names_a_failed_run_and_exits_non_zero(official_tree, tmp_path):
    out = tmp_path / 'parity'
    result = parity(['--modes', 'online', '--seeds', '0', '--meta_epochs', '1', '--sub_epochs', '1',
                     '--dataset_path', str(official_tree), '--class_name', 'no_such_class', '--out', str(out),
                     '--', *TINY], tmp_path)
    assert result.returncode == 1
    assert 'online seed 0: main.py exited' in result.stdout and 'online_seed0.log' in result.stdout


def test_a_run_stopped_part_way_is_read_as_partial(tmp_path):
    """main.py keeps the meta epochs of a running job under 'in_progress'; parity reads them, marked."""
    folder = tmp_path / 'online_seed0'
    folder.mkdir()
    (folder / 'results.json').write_text(json.dumps({'classes': [], 'in_progress': {'auroc': [0.8, 0.9, 0.85]}}))
    entry = read_entry(type('Args', (), {'out': str(tmp_path)}), 'online', 0)
    assert entry['partial'] and entry['last_auroc'] == 0.85 and entry['max_auroc'] == 0.9
    assert entry['max_auroc_epoch'] == 1  # counted from 0, as the official observer
    assert read_entry(type('Args', (), {'out': str(tmp_path)}), 'online', 1) is None
