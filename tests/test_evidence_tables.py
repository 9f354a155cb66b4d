"""The figures the docs take from docs/evidence/ equal the files: every marked table in docs/*.md is what
benchmarks/evidence_tables.py prints from them, and every kept run says where it ran. Reads files only (no
data, no model); `python benchmarks/evidence_tables.py --markdown --write` rewrites the tables."""
import glob
import importlib.util
import os
import re

import pytest

from conftest import REPO_ROOT, doc_names, read_repo_file

EVIDENCE_DIR = os.path.join(REPO_ROOT, 'docs', 'evidence')


def load_script():
    spec = importlib.util.spec_from_file_location(
        'evidence_tables', os.path.join(REPO_ROOT, 'benchmarks', 'evidence_tables.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evidence_tables = load_script()


def differences(text, written):
    """[(table name, why)] where a page's marked tables differ from the written ones."""
    found = []
    for name, body in evidence_tables.marked_tables(text).items():
        if name not in written:
            found.append((name, 'no such table'))
        elif body != written[name]:
            found.append((name, 'differs from docs/evidence'))
    return found


@pytest.fixture(scope='module')
def written():
    return evidence_tables.tables()


def test_every_table_is_in_a_page(written):
    shown = set()
    for page in doc_names():
        shown.update(evidence_tables.marked_tables(read_repo_file(page)))
    assert shown == set(written), 'python benchmarks/evidence_tables.py --markdown prints the tables to paste'


@pytest.mark.parametrize('page', doc_names())
def test_tables_equal_the_evidence(page, written):
    text = read_repo_file(page)
    assert text.count('<!-- evidence table:') == len(evidence_tables.marked_tables(text)), 'unmatched markers'
    assert not differences(text, written), (
        f'{page}: {differences(text, written)}; run `python benchmarks/evidence_tables.py --markdown --write`')


def test_a_drifted_number_is_caught(written):
    text = read_repo_file('docs/results.md')
    (number, *_) = re.findall(r'\| (0\.\d{4}) \|', text.split('<!-- evidence table: runs', 1)[1])
    drifted = text.replace(f'| {number} |', f'| {float(number) + 0.0001:.4f} |', 1)
    assert differences(drifted, written) == [('runs', 'differs from docs/evidence')]
    assert evidence_tables.replace_tables(drifted, written) == text


def test_every_kept_run_has_its_time_and_machine():
    names = [os.path.basename(path)[:-len('.results.json')]
             for path in glob.glob(os.path.join(EVIDENCE_DIR, '*.results.json'))]
    assert names
    for run in evidence_tables.load_runs():
        assert set(run['machine']) >= {'cpu', 'gpu', 'torch', 'date'}, run['name']
        assert re.fullmatch(r'\d{4}-\d\d-\d\d', run['machine']['date']), run['name']
        # evidence_runs.sh runs config.py's cpu_flow_kernel 'auto': oneDNN on AMD CPUs, PyTorch's default elsewhere
        expected = 'onednn' if run['machine']['cpu'].startswith('AMD') else 'default'
        assert run['config']['cpu_flow_kernel'] == expected, f"{run['name']}: machine and kernel disagree"
        # the options shown are the ones the run was started with, where its time summary names them
        commands = [line for line in run['time'] if 'Command being timed' in line and '--resume' not in line]
        for command in commands:
            assert f'python main.py {evidence_tables.main_options(run)} --results_dir' in command, run['name']


def test_readme_headline_mtd_row_is_the_kept_run():
    (mtd_full,) = [run for run in evidence_tables.load_runs() if run['name'] == 'mtd_full']
    entry = mtd_full['entry']
    rows = [line for line in read_repo_file('README.md').splitlines() if line.startswith('| MTD |')]
    assert rows, 'README has no MTD row'
    assert f"{entry['last_auroc']:.4f}" in rows[0] and f"{entry['max_auroc']:.4f} ({entry['max_auroc_epoch']})" in rows[0]


def test_durations_and_image_counts_are_written_plainly():
    assert evidence_tables.duration_text(48364.97) == '13 h 26 min 5 s'
    assert evidence_tables.duration_text(1445.59) == '24 min 6 s'
    assert evidence_tables.images_text({'n_train_images': 16, 'train_subset_of': 200}) == '16 of 200'
    assert evidence_tables.images_text({'n_train_images': 761}) == '761 (all)'
    assert evidence_tables.mean_std_text([0.6, 0.7]) == '0.6500 ± 0.0707'
