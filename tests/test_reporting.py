"""Every layout read where it lies, all classes in one run, seeds, and the results files."""
import json
import os

import numpy as np
import pytest

from conftest import write_image
from main import main
from base.metrics import defect_type_aurocs
from reporting.summary import summary_rows
from image_data.layouts import detect_layout, find_class_samples

TINY = ['--pretrained', 'false', '--img_size', '64', '--n_scales', '1', '--fc_internal', '16',
        '--n_coupling_blocks', '2', '--meta_epochs', '2', '--sub_epochs', '1', '--n_transforms', '2',
        '--n_transforms_test', '2', '--feature_cache', 'false', '--verbose', 'false']


def make_btad(root):
    """BTAD as distributed: <root>/{01,02}/train/ok, test/{ok,ko}, ground_truth/ko; .bmp in 01, .png in 02."""
    rng = np.random.RandomState(1)
    for class_name, ext in (('01', 'bmp'), ('02', 'png')):
        for folder, count in (('train/ok', 3), ('test/ok', 2), ('test/ko', 2)):
            for i in range(count):
                color = tuple(int(v) for v in rng.randint(0, 255, size=3))
                write_image(str(root / class_name / folder / f'{i:04d}.{ext}'), color)
        for i in range(2):
            write_image(str(root / class_name / 'ground_truth' / 'ko' / f'{i:04d}.png'), 255, mode='L')


def test_btad_layout(tmp_path):
    make_btad(tmp_path)
    for class_name, ext in (('01', '.bmp'), ('02', '.png')):
        assert detect_layout(str(tmp_path / class_name)) == 'btad'
        train, test = find_class_samples(str(tmp_path), class_name)
        assert len(train) == 3 and all(s.path.endswith(ext) and s.label == 0 for s in train)
        assert sorted((s.defect_type, s.label) for s in test) == [('ko', 1), ('ko', 1), ('ok', 0), ('ok', 0)]
        for sample in test:
            if sample.label:
                assert sample.mask_path == str(tmp_path / class_name / 'ground_truth' / 'ko'
                                               / (os.path.splitext(os.path.basename(sample.path))[0] + '.png'))
            else:
                assert sample.mask_path is None


def test_mvtec_layout_masks(official_tree):
    write_image(str(official_tree / 'widget' / 'ground_truth' / 'scratch' / '000_mask.png'), 255, mode='L')
    write_image(str(official_tree / 'widget' / 'ground_truth' / 'scratch' / '001_mask.png'), 255, mode='L')
    assert detect_layout(str(official_tree / 'widget')) == 'mvtec'
    _, test = find_class_samples(str(official_tree), 'widget')
    masks = {(s.defect_type, os.path.basename(s.path)): s.mask_path for s in test}
    assert masks[('scratch', '000.png')].endswith(os.path.join('ground_truth', 'scratch', '000_mask.png'))
    assert masks[('dent', '000.png')] is None  # no mask shipped for it
    assert masks[('good', '000.png')] is None


def test_official_layout_detected(official_tree):
    assert detect_layout(str(official_tree / 'widget')) == 'official'


def test_defect_type_auroc():
    types = ['good', 'good', 'good', 'scratch', 'scratch', 'dent']
    labels = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.9, 0.8, 0.15]
    result = defect_type_aurocs(types, labels, scores)
    assert result == {'dent': pytest.approx(1 / 3), 'scratch': 1.0}


def test_mean_and_std_over_seeds():
    runs = [dict(class_name='a', last_auroc=0.9, max_auroc=1.0, max_auroc_epoch=3),
            dict(class_name='a', last_auroc=0.7, max_auroc=0.8, max_auroc_epoch=5),
            dict(class_name='b', last_auroc=0.5, max_auroc=0.6, max_auroc_epoch=1)]
    rows = summary_rows(runs)
    assert rows[0] == ['a', '0.8000 ± 0.1414', '0.9000 ± 0.1414', '4.0 ± 1.4', 2]  # sample std, ddof=1
    assert rows[1][:4] == ['b', '0.5000', '0.6000', '1']
    assert rows[2][:3] == ['mean', '0.6500', '0.7500']  # mean over classes of the class means


def test_all_classes_with_a_failing_one_and_files_written(official_tree, tmp_path, capsys):
    import shutil
    shutil.copytree(official_tree / 'widget', official_tree / 'gadget')
    (official_tree / 'broken' / 'train' / 'good').mkdir(parents=True)  # no images at all
    out = tmp_path / 'out'
    code = main(['--dataset_path', str(official_tree), '--class_name', 'all', '--seeds', '0,1',
                 '--results_dir', str(out), *TINY])
    printed = capsys.readouterr().out
    assert code == 1  # something failed, the rest ran
    assert 'class broken skipped' in printed
    results = json.loads((out / 'results.json').read_text())
    assert [(r['class_name'], r['seed']) for r in results['classes']] == \
        [('gadget', 0), ('gadget', 1), ('widget', 0), ('widget', 1)]
    assert results['failed'][0]['class_name'] == 'broken'
    for entry in results['classes']:
        assert set(entry['defect_type_auroc_last']) == {'scratch', 'dent'}
        assert entry['layout'] == 'official'
    markdown = (out / 'results.md').read_text()
    assert '| gadget |' in markdown and '| mean |' in markdown and '±' in markdown
    assert '- broken:' in markdown and '| widget | dent |' in markdown
    assert '`img_size` = 64 (paper/official: 448)' in markdown
    assert markdown.split('## AUROC per defect type')[0].strip() in printed  # the printed summary is results.md
    assert (out / 'results.csv').read_text().startswith('class,last_auroc,max_auroc,max_auroc_epoch,runs')
    for name in ['auroc.png'] + [f'{c}_seed{s}_{kind}' for c in ('gadget', 'widget') for s in (0, 1)
                                 for kind in ('scores.png', 'roc.png', 'scores.csv')]:
        assert (out / name).stat().st_size > 0, name
    csv_lines = (out / 'widget_seed0_scores.csv').read_text().splitlines()
    assert csv_lines[0] == 'file,label,defect_type,score_last_epoch,score_max_epoch' and len(csv_lines) == 6
    assert not [p for p in out.iterdir() if p.name.endswith('.part')]


def test_btad_tree_runs_without_moving_a_file(tmp_path):
    make_btad(tmp_path / 'btad')
    out = tmp_path / 'out'
    assert main(['--dataset_path', str(tmp_path / 'btad'), '--class_name', 'all', '--results_dir', str(out), *TINY]) == 0
    results = json.loads((out / 'results.json').read_text())
    assert [r['class_name'] for r in results['classes']] == ['01', '02']
    assert all(r['layout'] == 'btad' and r['defect_type_auroc_last'].keys() == {'ko'} for r in results['classes'])
    assert all(mask.endswith('.png') for r in results['classes'] for mask in r['test_mask_files'] if mask)


def test_progress_bars_work_and_do_not_flood_a_log_file(official_tree, tmp_path):
    import subprocess
    import sys

    from conftest import REPO_ROOT
    log_path = tmp_path / 'log.txt'
    with open(log_path, 'w') as log:
        result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'main.py'), '--dataset_path',
                                 str(official_tree), '--class_name', 'widget', '--results_dir', str(tmp_path / 'out'),
                                 '--hide_tqdm_bar', 'false', *TINY[:-2], '--meta_epochs', '3', '--sub_epochs', '3'],
                                stdout=log, stderr=subprocess.STDOUT, timeout=300)
    assert result.returncode == 0
    text = log_path.read_text()
    assert 'train 0.0' in text  # the bar of the first sub epoch was drawn
    assert text.count('\r') < 60  # 9 sub epochs + 3 test passes: a few redraws each, not one per step
    assert text.count('AUROC: last') == 3


def test_f1_max_and_f1_at_a_threshold():
    from base.metrics import f1_at_threshold, f1_max
    labels, scores = [0, 0, 1, 1, 0, 1], [0.1, 0.2, 0.9, 0.8, 0.85, 0.3]
    best, threshold = f1_max(labels, scores)
    # the best cut is above 0.2: predictions 0.3, 0.8, 0.85, 0.9 -> precision 3/4, recall 1 -> F1 6/7
    assert best == pytest.approx(6 / 7) and threshold == pytest.approx(0.2)
    assert f1_at_threshold(labels, scores, threshold) == pytest.approx(best)
    assert f1_at_threshold(labels, scores, 0.85) == pytest.approx(2 * 1.0 * (1 / 3) / (1 + 1 / 3))
    assert f1_at_threshold(labels, scores, 1.0) == 0.0  # nothing predicted anomalous
    assert all(np.isnan(f1_max([0, 0], [0.1, 0.2])))
