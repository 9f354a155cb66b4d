"""A full disk loses nothing: the free-space check, every write failing with ENOSPC, damaged files."""
import logging
import errno
import json
import os
import shutil
import subprocess

import pytest
import torch

from base import atomic_files
from runner import disk
from conftest import tiny_config
from base.feature_cache import feature_cache_key, load_cached_features
from model import seeded_view_features
from main import main
from model import DifferNet
from image_data.layouts import find_class_samples

TINY = ['--pretrained', 'false', '--img_size', '64', '--n_scales', '1', '--fc_internal', '16',
        '--n_coupling_blocks', '2', '--meta_epochs', '2', '--sub_epochs', '1', '--n_transforms', '2',
        '--n_transforms_test', '2', '--device', 'cpu']


@pytest.fixture
def two_classes(official_tree):
    """The widget class twice (widget, gadget), so that a run has a next class to go on with."""
    shutil.copytree(official_tree / 'widget', official_tree / 'gadget')
    return official_tree


def failing_torch_save(monkeypatch, fragment, error):
    """torch.save raises `error` for files whose name holds `fragment` (as a full disk makes it fail)."""
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if fragment in os.path.basename(str(path)):
            raise error
        return real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, 'save', save)


def no_temporaries(folder):
    return not [name for _, _, names in os.walk(folder) for name in names if name.endswith('.part')]


def test_a_checkpoint_that_meets_a_full_disk_keeps_the_numbers_and_the_next_class_runs(two_classes, tmp_path,
                                                                                       monkeypatch, capsys):
    failing_torch_save(monkeypatch, 'widget_checkpoint', RuntimeError('[enforce fail at inline_container.cc:672] . '
                                                                      'unexpected pos 64 vs 0'))
    out = tmp_path / 'out'
    code = main(['--dataset_path', str(two_classes), '--class_name', 'widget,gadget', '--results_dir', str(out), *TINY])
    assert code == 1  # a failure is reported at the end
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if 'widget_checkpoint.pt' in line and line.startswith('error:'))
    assert 'free in' in line and 'its checkpoint was not written' in line
    assert line.endswith(f'continue with: python main.py --resume {out}')  # from its resume state: no training
    results = json.loads((out / 'results.json').read_text())
    widget, gadget = results['classes']
    assert widget['class_name'] == 'widget' and widget['status'] == 'done' and widget['test_scores']
    assert 'checkpoint' not in widget and 'cannot write' in widget['checkpoint_error']
    assert gadget['class_name'] == 'gadget' and gadget['checkpoint'] == 'gadget_checkpoint.pt'  # the next class ran
    assert results['failed'][0]['error'].startswith('finished, but its checkpoint was not written')
    assert '| widget |' in (out / 'results.md').read_text()
    assert not (out / 'widget_checkpoint.pt').exists() and no_temporaries(out)


@pytest.mark.parametrize('fragment, warning', [('widget_seed0', 'without a newer resume state'),
                                               ('features_', 'without caching these features')])
def test_a_resume_state_or_cache_file_that_cannot_be_written_is_a_warning(two_classes, tmp_path, monkeypatch, capsys,
                                                                          fragment, warning):
    failing_torch_save(monkeypatch, fragment, OSError(errno.ENOSPC, 'No space left on device'))
    out = tmp_path / 'out'
    assert main(['--dataset_path', str(two_classes), '--class_name', 'widget', '--results_dir', str(out),
                 '--resume_interval_s', '0', '--feature_cache_dir', str(tmp_path / 'cache'), *TINY]) == 0
    printed = capsys.readouterr().out
    assert warning in printed and 'No space left on device' in printed
    assert json.loads((out / 'results.json').read_text())['classes'][0]['status'] == 'done'
    assert no_temporaries(out) and no_temporaries(tmp_path / 'cache')


def test_results_files_that_cannot_be_written_are_written_again_later(two_classes, tmp_path, monkeypatch, capsys):
    real_write = atomic_files.write_text_atomic
    failures = []

    def write_text(path, text):
        if path.endswith('results.md') and not failures:  # the first results.md write meets a full disk
            failures.append(path)
            raise atomic_files.WriteFailed(f'cannot write {path} (OSError: No space left on device); 0 B free')
        return real_write(path, text)
    monkeypatch.setattr(atomic_files, 'write_text_atomic', write_text)
    from reporting import results_files as report
    monkeypatch.setattr(report, 'write_text_atomic', write_text)
    out = tmp_path / 'out'
    assert main(['--dataset_path', str(two_classes), '--class_name', 'widget', '--results_dir', str(out), *TINY]) == 0
    assert failures and 'results files are written again' in capsys.readouterr().out
    assert '| widget |' in (out / 'results.md').read_text()


def test_the_free_space_check_refuses_a_run_that_cannot_fit(two_classes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(disk, 'free_bytes', lambda path: 1_000_000)
    out = tmp_path / 'out'
    assert main(['--dataset_path', str(two_classes), '--class_name', 'widget,gadget', '--results_dir', str(out),
                 '--feature_cache_dir', str(tmp_path / 'cache'), *TINY, '--fc_internal', '256']) == 2
    error = capsys.readouterr().err
    assert error.startswith('error: not enough disk space: the run writes') and error.count('\n') == 1
    assert '2 checkpoint file(s)' in error and 'resume states' in error and '1 MB is free' in error
    assert '--save_checkpoint false' in error and '--results_dir' in error
    needs = disk.space_needs(tiny_config(save_checkpoint=False, resume_state=False, feature_cache=False),
                             str(out), [(4, 3)])
    assert needs == {str(out): [('results', disk.RESULTS_BYTES_PER_JOB)]}  # the results files only


def test_a_truncated_resume_state_is_named_in_one_line(two_classes, tmp_path, capsys):
    out = tmp_path / 'out'
    state = out / 'resume' / 'widget_seed0.pt'
    common = ['--dataset_path', str(two_classes), '--class_name', 'widget', '--results_dir', str(out), *TINY]
    assert main(common + ['--meta_epochs', '3', '--resume_interval_s', '0', '--save_checkpoint', 'false']) == 0
    (out / 'resume').mkdir(exist_ok=True)
    model = DifferNet(tiny_config(fc_internal=16)).eval()
    torch.save({'flow': model.nf.state_dict()}, state)
    state.write_bytes(state.read_bytes()[:200])  # a power cut mid-write on another machine
    results = json.loads((out / 'results.json').read_text())
    results['classes'], results['failed'] = [], []
    (out / 'results.json').write_text(json.dumps(results))
    capsys.readouterr()
    assert main(['--resume', str(out)]) in (1, 2)
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if 'resume state' in line and 'damaged' in line)
    assert str(state) in line and 'delete it to train this class from its start' in line and 'Traceback' not in printed


def test_a_truncated_cache_file_is_recomputed_and_replaced(official_tree, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    config = tiny_config(feature_cache=True, feature_cache_dir=str(tmp_path / 'cache'))
    torch.manual_seed(0)
    model = DifferNet(config).eval()
    samples, _ = find_class_samples(str(official_tree), 'widget')
    first, _ = seeded_view_features(model, samples, 3, 5, config, torch.device('cpu'), 'views')
    key = feature_cache_key(samples, 3, 5, False, model.extractor_digest(), config, 'cpu')
    path = tmp_path / 'cache' / f'features_{key}.pt'
    path.write_bytes(path.read_bytes()[:100])
    again, _ = seeded_view_features(model, samples, 3, 5, config, torch.device('cpu'), 'views')
    assert torch.equal(first, again)
    assert any('is damaged' in line and str(path) in line for line in caplog.messages)
    assert load_cached_features(str(tmp_path / 'cache'), key) is not None  # replaced whole


def test_a_real_small_file_system_fills_and_nothing_is_lost(two_classes, tmp_path, monkeypatch, capsys):
    """A 3 MB tmpfs as results_dir with checkpoints of about 10 MB: the free-space check refuses the run;
    with the check out of the way (a disk that another process filled after it), the checkpoint write
    meets a real ENOSPC and the numbers are kept. Needs permission to mount (root in a container that
    allows it)."""
    mount_point = tmp_path / 'small'
    mount_point.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f'cannot mount a small file system here ({mounted.stderr.strip()[:80] or "mount failed"})')
    try:
        common = ['--dataset_path', str(two_classes), '--class_name', 'widget,gadget', '--feature_cache', 'false',
                  '--resume_state', 'false', *TINY, '--fc_internal', '384', '--n_coupling_blocks', '3']
        assert main([*common, '--results_dir', str(mount_point / 'refused')]) == 2
        assert 'not enough disk space' in capsys.readouterr().err
        monkeypatch.setattr(disk, 'check_free_space', lambda needs: None)
        from runner import jobs
        monkeypatch.setattr(jobs, 'check_free_space', lambda needs: None)
        out = mount_point / 'out'
        assert main([*common, '--results_dir', str(out)]) == 1
        printed = capsys.readouterr().out
        assert 'widget_checkpoint.pt' in printed and 'its checkpoint was not written' in printed, printed
        results = json.loads((out / 'results.json').read_text())
        assert [entry['class_name'] for entry in results['classes']] == ['widget', 'gadget']
        assert all(entry['test_scores'] and 'checkpoint_error' in entry for entry in results['classes'])
        assert no_temporaries(out) and not list(out.glob('*.pt'))
    finally:
        subprocess.run(['umount', str(mount_point)], capture_output=True)
