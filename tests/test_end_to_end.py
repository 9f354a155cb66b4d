"""A whole small DifferNet run on the demo set, through main.py, with the real ImageNet weights."""
import json
import os

from main import main

SMALL = ['--img_size', '224', '--n_scales', '2', '--fc_internal', '512', '--meta_epochs', '2',
         '--sub_epochs', '8', '--n_transforms_test', '8', '--feature_cache', 'false']


def run(demo_root, out, *extra):
    code = main(['--dataset_path', str(demo_root), '--class_name', 'demo_washer', '--results_dir', str(out),
                 *SMALL, *extra])
    assert code == 0
    with open(os.path.join(out, 'results.json')) as handle:
        return json.load(handle)['classes'][0]


def test_demo_reaches_auroc_1_and_repeats_exactly(demo_root, tmp_path, capsys):
    first = run(demo_root, tmp_path / 'a', '--train_feature_pool', '0')
    printed = capsys.readouterr().out
    assert 'AUROC: last' in printed and 'train loss' in printed and 'test_loss' in printed
    assert first['max_auroc'] == 1.0 and first['last_auroc'] == 1.0
    second = run(demo_root, tmp_path / 'b', '--train_feature_pool', '0')
    assert second['auroc'] == first['auroc'] and second['test_scores'] == first['test_scores']
    assert second['train_loss'] == first['train_loss']


def test_feature_pool_mode_reaches_auroc_1_and_warns(demo_root, tmp_path, capsys):
    result = run(demo_root, tmp_path / 'pool', '--train_feature_pool', '8')
    assert result['max_auroc'] == 1.0
    assert 'warning: train_feature_pool 8 draws training views from a fixed pool' in capsys.readouterr().out
