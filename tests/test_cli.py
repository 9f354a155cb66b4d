"""The command line: every config value overridable, typed, documented; user mistakes exit 2 in one line."""
import json
import os
import subprocess
import sys

import pytest

import config
from conftest import REPO_ROOT
from base.errors import UserError
from main import parse_command_line
from base.settings import build_config, config_comments


def run_main(*args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'main.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_every_config_value_has_a_comment_and_an_option():
    names = [name for name in vars(config) if not name.startswith('_')]
    assert set(config_comments()) == set(names)
    help_text = run_main('--help').stdout
    for name, comment in config_comments().items():
        assert f'--{name}' in help_text
        assert comment.split()[0] in help_text


def test_overrides_are_typed():
    cfg, _ = parse_command_line(['--class_name', 'bottle', '--meta_epochs', '2', '--lr_init', '1e-3',
                                 '--pretrained', 'false', '--adam_betas', '0.9,0.99', '--dataset_path', 'x'])
    assert cfg.class_name == 'bottle' and cfg.meta_epochs == 2 and cfg.lr_init == 1e-3
    assert cfg.pretrained is False and cfg.adam_betas == (0.9, 0.99) and cfg.dataset_path == 'x'
    assert cfg.sub_epochs == config.sub_epochs


def test_unknown_name_refused():
    result = run_main('--meta_epoch', '3')
    assert result.returncode == 2
    assert 'did you mean --meta_epochs' in result.stderr and 'Traceback' not in result.stderr
    with pytest.raises(UserError, match='unknown setting'):
        build_config(learning_rate=1)


def test_wrong_type_refused():
    result = run_main('--meta_epochs', 'many')
    assert result.returncode == 2
    assert "--meta_epochs expects int" in result.stderr and 'Traceback' not in result.stderr


@pytest.mark.parametrize('args, message', [
    (['--dataset_path', 'no/such/folder'], 'dataset path no/such/folder does not exist'),
    (['--class_name', 'widgit'], 'did you mean widget'),
])
def test_bad_paths_are_one_line_errors(official_tree, args, message):
    if args[0] == '--class_name':
        args = args + ['--dataset_path', str(official_tree)]
    result = run_main(*args, '--pretrained', 'false', '--results_dir', str(official_tree / 'out'))
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and 'Traceback' not in result.stderr


def test_tiny_run_writes_results_json(official_tree, tmp_path):
    out = tmp_path / 'run'
    result = run_main('--dataset_path', str(official_tree), '--class_name', 'widget', '--results_dir', str(out),
                      '--pretrained', 'false', '--img_size', '64', '--n_scales', '1', '--fc_internal', '16',
                      '--n_coupling_blocks', '2', '--meta_epochs', '2', '--sub_epochs', '2',
                      '--n_transforms', '2', '--n_transforms_test', '2', '--feature_cache', 'false')
    assert result.returncode == 0, result.stderr
    assert 'RANDOM weights' in result.stdout
    assert result.stdout.count('AUROC: last') == 2
    assert '| widget |' in result.stdout
    results = json.loads((out / 'results.json').read_text())
    entry = results['classes'][0]
    assert len(entry['auroc']) == 2 and len(entry['test_loss']) == 2
    assert [len(losses) for losses in entry['train_loss']] == [2, 2]
    assert entry['max_auroc'] == max(entry['auroc'])
    assert entry['auroc'][entry['max_auroc_epoch']] == entry['max_auroc']
    assert entry['last_auroc'] == entry['auroc'][-1] and entry['wall_time_s'] > 0
    assert results['config']['meta_epochs'] == 2 and results['config']['lr_init'] == 2e-4


def test_help_answers_without_importing_torch():
    """--help is read before anything heavy: torch alone takes seconds to import."""
    script = ('import sys\nimport main\ntry:\n    main.main(["--help"])\nexcept SystemExit:\n    pass\n'
              'print("torch imported" if "torch" in sys.modules else "torch not imported")')
    done = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert '--bf16_autocast' in done.stdout and done.stdout.strip().endswith('torch not imported'), done.stderr
