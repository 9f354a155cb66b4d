"""Runs that survive: bad files, odd image modes, no anomalies, NaN, out of memory, interruption, resume."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from official_views import view_transform
from PIL import Image

import utils
import train
from base.atomic_files import write_json_atomic
from conftest import REPO_ROOT, tiny_config
from base.errors import DataProblems
from main import main
from model import DifferNet
from image_data.layouts import find_class_samples, scan_class
from image_data.image_files import load_rgb

TINY = ['--pretrained', 'false', '--img_size', '64', '--n_scales', '1', '--fc_internal', '16',
        '--n_coupling_blocks', '2', '--meta_epochs', '2', '--sub_epochs', '1', '--n_transforms', '2',
        '--n_transforms_test', '2', '--feature_cache', 'false', '--verbose', 'false']


def read_results(out):
    return json.loads((out / 'results.json').read_text())


def test_all_bad_files_of_a_class_reported_at_once_and_other_classes_run(official_tree, tmp_path, capsys):
    import shutil
    shutil.copytree(official_tree / 'widget', official_tree / 'gadget')
    good = official_tree / 'gadget' / 'train' / 'good'
    (good / 'corrupt.png').write_bytes(open(good / '000.png', 'rb').read()[:60])  # truncated PNG
    (good / 'notes.txt').write_text('not an image')
    (official_tree / 'gadget' / 'test' / 'dent' / 'empty.png').write_bytes(b'')
    train_samples, test_samples = find_class_samples(str(official_tree), 'gadget')
    with pytest.raises(DataProblems) as caught:
        scan_class(str(official_tree), 'gadget', train_samples, test_samples)
    reasons = dict(caught.value.problems)
    assert set(os.path.basename(path) for path in reasons) == {'corrupt.png', 'notes.txt', 'empty.png'}
    assert 'zero-byte' in reasons[str(official_tree / 'gadget' / 'test' / 'dent' / 'empty.png')]

    out = tmp_path / 'out'
    code = main(['--dataset_path', str(official_tree), '--class_name', 'all', '--results_dir', str(out), *TINY])
    printed = capsys.readouterr().out
    assert code == 1
    assert 'corrupt.png' in printed and 'notes.txt' in printed and 'empty.png' in printed
    results = read_results(out)
    assert [entry['class_name'] for entry in results['classes']] == ['widget']
    assert results['failed'][0]['class_name'] == 'gadget'
    assert 'gadget' in (out / 'results.md').read_text()


def test_other_image_modes_are_scored_like_their_rgb_conversions(tmp_path):
    rng = np.random.RandomState(0)
    rgb = Image.fromarray(rng.randint(0, 256, size=(48, 40, 3)).astype(np.uint8), 'RGB')
    gray = rgb.convert('L')
    cases = {
        'gray': (gray, gray.convert('RGB')),
        'rgba': (Image.merge('RGBA', (*rgb.split(), gray)), rgb),
        'palette': (rgb.quantize(16), rgb.quantize(16).convert('RGB')),
        'sixteen_bit': (Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), gray.convert('RGB')),
    }
    config = tiny_config(transf_rotations=False)
    torch.manual_seed(0)
    model = DifferNet(config).eval()
    transform = view_transform(config)
    for name, (image, expected_rgb) in cases.items():
        image.save(tmp_path / f'{name}.png')
        expected_rgb.save(tmp_path / f'{name}_rgb.png')
        loaded = load_rgb(str(tmp_path / f'{name}.png'))
        assert loaded.mode == 'RGB'
        assert np.array_equal(np.asarray(loaded), np.asarray(load_rgb(str(tmp_path / f'{name}_rgb.png')))), name
        with torch.no_grad():
            z_mode, _ = model(transform(loaded).unsqueeze(0))
            z_rgb, _ = model(transform(expected_rgb).unsqueeze(0))
        assert torch.equal(z_mode, z_rgb), name
    assert Image.open(tmp_path / 'sixteen_bit.png').mode.startswith('I')


def test_test_set_without_anomalies_reports_loss_and_undefined_auroc(official_tree, tmp_path, capsys):
    import shutil
    for defect in ('scratch', 'dent'):
        shutil.rmtree(official_tree / 'widget' / 'test' / defect)
    out = tmp_path / 'out'
    assert main(['--dataset_path', str(official_tree), '--class_name', 'widget', '--results_dir', str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert 'no anomalous images' in printed and 'AUROC: not defined' in printed
    entry = read_results(out)['classes'][0]
    assert entry['auroc'] == [None, None] and all(np.isfinite(entry['test_loss']))
    assert '| widget | n/a | n/a |' in (out / 'results.md').read_text()


def test_nan_loss_stops_the_class_keeps_finished_epochs_and_goes_on(official_tree, tmp_path, monkeypatch, capsys):
    import shutil
    shutil.copytree(official_tree / 'widget', official_tree / 'zebra')
    real_step, calls = train.flow_step, []

    def step_with_nan(model, optimizer, features, config):
        calls.append(1)
        return float('nan') if len(calls) == 4 else real_step(model, optimizer, features, config)
    monkeypatch.setattr(train, 'flow_step', step_with_nan)
    out = tmp_path / 'out'
    code = main(['--dataset_path', str(official_tree), '--class_name', 'widget,zebra', '--results_dir', str(out),
                 *TINY[:-6], '--meta_epochs', '3', '--sub_epochs', '2', '--feature_cache', 'false'])
    printed = capsys.readouterr().out
    assert code == 1
    assert 'loss is nan at meta epoch 1, sub epoch 1' in printed
    widget, zebra = read_results(out)['classes']
    assert widget['status'] == 'diverged' and len(widget['auroc']) == 1 and widget['max_auroc_epoch'] == 0
    assert zebra['status'] == 'done' and len(zebra['auroc']) == 3


def test_out_of_memory_says_what_to_lower(official_tree, tmp_path, monkeypatch, capsys):
    def no_memory(*args):
        raise RuntimeError('DefaultCPUAllocator: not enough memory: you tried to allocate 123 bytes. out of memory')
    monkeypatch.setattr(train, 'flow_step', no_memory)
    code = main(['--dataset_path', str(official_tree), '--class_name', 'widget', '--results_dir', str(tmp_path / 'o'),
                 *TINY])
    printed = capsys.readouterr().out
    assert code == 2
    assert 'out of memory on cpu in class widget: lower batch_size (24)' in printed


def test_dataloader_workers_failing_fall_back_to_main_process(official_tree, tmp_path, monkeypatch, capsys):
    real_loader = utils.DataLoader

    def loader_without_workers(*args, num_workers=0, **kwargs):
        if num_workers:
            raise RuntimeError('unable to open shared memory object')
        return real_loader(*args, num_workers=num_workers, **kwargs)
    monkeypatch.setattr(utils, 'DataLoader', loader_without_workers)
    code = main(['--dataset_path', str(official_tree), '--class_name', 'widget', '--results_dir', str(tmp_path / 'o'),
                 '--num_workers', '2', '--cache_test_features', 'false', '--view_backend', 'pil', *TINY])
    assert code == 0
    assert 'loading images in the main process instead' in capsys.readouterr().out


def test_results_dir_of_an_earlier_run_is_not_overwritten(official_tree, tmp_path, capsys):
    out = tmp_path / 'out'
    assert main(['--dataset_path', str(official_tree), '--class_name', 'widget', '--results_dir', str(out), *TINY]) == 0
    before = (out / 'results.json').read_text()
    assert main(['--dataset_path', str(official_tree), '--class_name', 'widget', '--results_dir', str(out), *TINY]) == 2
    assert 'holds an earlier run' in capsys.readouterr().err
    assert (out / 'results.json').read_text() == before


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / 'results.json')
    write_json_atomic(path, {'a': 1, 'auroc': float('nan')})
    assert json.loads(open(path).read()) == {'a': 1, 'auroc': None}
    with pytest.raises(TypeError):
        write_json_atomic(path, {'a': object()})
    assert json.loads(open(path).read()) == {'a': 1, 'auroc': None}


RESUMABLE = ['--pretrained', 'false', '--img_size', '64', '--n_scales', '1', '--fc_internal', '32',
             '--n_coupling_blocks', '2', '--meta_epochs', '5', '--sub_epochs', '3', '--n_transforms', '2',
             '--n_transforms_test', '3', '--batch_size', '2', '--feature_cache', 'false', '--train_feature_pool', '0',
             '--resume_interval_s', '0']


def test_interrupted_by_signal_then_resumed_gives_the_uninterrupted_results(official_tree, tmp_path):
    import shutil
    shutil.copytree(official_tree / 'widget', official_tree / 'gadget')
    common = ['--dataset_path', str(official_tree), '--class_name', 'widget,gadget', *RESUMABLE]
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    main_py = os.path.join(REPO_ROOT, 'main.py')
    straight = tmp_path / 'straight'
    subprocess.run([sys.executable, main_py, *common, '--results_dir', str(straight)], check=True,
                   capture_output=True, env=env, timeout=600)

    stopped = tmp_path / 'stopped'
    process = subprocess.Popen([sys.executable, main_py, *common, '--results_dir', str(stopped)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:  # stop it once the second class has finished a meta epoch
        try:
            progress = json.loads((stopped / 'results.json').read_text())
        except (OSError, ValueError):
            progress = None
        if progress and progress.get('in_progress') and progress['in_progress']['class_name'] == 'gadget' \
                and len(progress['in_progress']['auroc']) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130
    assert f'python main.py --resume {stopped}' in out
    interrupted = json.loads((stopped / 'results.json').read_text())
    assert [entry['class_name'] for entry in interrupted['classes']] == ['widget']
    assert interrupted['in_progress']['class_name'] == 'gadget'
    assert not [p for p in stopped.iterdir() if p.name.endswith('.part')] and os.path.isfile(stopped / 'resume' / 'gadget_seed0.pt')

    resumed = subprocess.run([sys.executable, main_py, '--resume', str(stopped)], capture_output=True, text=True,
                             env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert 'resumed after meta epoch' in resumed.stdout
    expected, got = json.loads((straight / 'results.json').read_text()), json.loads((stopped / 'results.json').read_text())
    for a, b in zip(expected['classes'], got['classes'], strict=True):
        for key in ('class_name', 'auroc', 'test_loss', 'train_loss', 'test_scores', 'best_test_scores',
                    'last_auroc', 'max_auroc', 'max_auroc_epoch'):
            assert a[key] == b[key], key
    assert got['in_progress'] is None and not os.path.isfile(stopped / 'resume' / 'gadget_seed0.pt')
