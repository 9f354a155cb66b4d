"""`--resume DIR` with options: those that change no number apply, those that would are refused in one line,
and a run resumes from any working directory (its paths are stored absolute)."""
import json
import os

import pytest

import train
from main import main

TINY = ['--pretrained', 'false', '--img_size', '64', '--n_scales', '1', '--fc_internal', '16',
        '--n_coupling_blocks', '2', '--meta_epochs', '3', '--sub_epochs', '1', '--n_transforms', '2',
        '--n_transforms_test', '2', '--save_checkpoint', 'false', '--resume_interval_s', '0', '--verbose', 'false']


@pytest.fixture
def stopped_run(official_tree, tmp_path, monkeypatch):
    """A run started with relative paths from tmp_path, stopped (Ctrl-C) during meta epoch 1: its resume
    state holds meta epoch 0. Returns (its folder, the command that started it)."""
    monkeypatch.chdir(tmp_path)
    command = ['--dataset_path', os.path.relpath(official_tree, tmp_path), '--class_name', 'widget',
               '--feature_cache_dir', 'cache', *TINY]
    real_log = train.log_evaluation

    def stop_at_meta_epoch_1(verbose, meta_epoch, *rest):
        if meta_epoch == 1:
            raise KeyboardInterrupt
        real_log(verbose, meta_epoch, *rest)
    with monkeypatch.context() as patch:
        patch.setattr(train, 'log_evaluation', stop_at_meta_epoch_1)
        assert main(command + ['--results_dir', 'stopped']) == 130
    assert os.path.isfile(tmp_path / 'stopped' / 'resume' / 'widget_seed0.pt')
    return tmp_path / 'stopped', command


def test_the_saved_configuration_holds_absolute_paths(stopped_run, tmp_path):
    out, _ = stopped_run
    saved = json.loads((out / 'results.json').read_text())['config']
    assert saved['dataset_path'] == str(tmp_path / 'data') and saved['feature_cache_dir'] == str(tmp_path / 'cache')


@pytest.mark.parametrize('option', [['--lr_init', '0.001'], ['--meta_epochs', '5'], ['--seed', '1'],
                                    ['--num_workers', '2'], ['--extract_batch_size', '5']])
def test_an_option_that_would_change_the_numbers_is_refused_in_one_line(stopped_run, capsys, option):
    out, _ = stopped_run
    capsys.readouterr()
    assert main(['--resume', str(out), *option]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert error.startswith(f'error: {option[0]} ') and 'would change the numbers' in error and str(out) in error
    assert os.path.isfile(out / 'resume' / 'widget_seed0.pt')  # nothing lost: it can still be resumed


def test_options_that_change_no_number_apply_from_another_directory(stopped_run, tmp_path, monkeypatch, capsys):
    out, command = stopped_run
    assert main(command + ['--results_dir', str(tmp_path / 'straight')]) == 0  # the uninterrupted run
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the run's relative paths must not matter now
    capsys.readouterr()
    assert main(['--resume', str(out), '--feature_cache_dir', str(tmp_path / 'other_cache'), '--device', 'cpu',
                 '--verbose', 'true', '--grad_map_viz', 'false']) == 0
    printed = capsys.readouterr().out
    assert 'resumed after meta epoch 0' in printed
    assert f"resume: feature_cache_dir '{tmp_path / 'cache'}' -> '{tmp_path / 'other_cache'}'" in printed
    assert 'Epoch: 1.0' in printed  # verbose applies
    assert os.listdir(tmp_path / 'other_cache')  # so does the cache folder
    resumed = json.loads((out / 'results.json').read_text())
    straight = json.loads((tmp_path / 'straight' / 'results.json').read_text())
    assert resumed['classes'][0]['test_scores'] == straight['classes'][0]['test_scores']
    assert resumed['classes'][0]['auroc'] == straight['classes'][0]['auroc']
    assert resumed['config']['feature_cache_dir'] == str(tmp_path / 'other_cache')
