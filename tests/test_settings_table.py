"""The settings table: every setting of config.py once, with its paper value or the reason it has none; the
lists the code uses derive from it; --resume applies what changes no number and refuses the rest."""
import ast
import glob
import os

import pytest

from base.errors import UserError
from base.settings import (build_config, config_comments, config_defaults, deviations_from_paper, resumed_config,
                           settings_group, stored_config)
from base.settings_table import (CHECKPOINT_SETTINGS, FEATURE_CACHE_SETTINGS, FLAGS, GROUPS, NO_PAPER_VALUE,
                                 RESUMABLE_SETTINGS, SETTINGS, names_in, paper_values)
from conftest import REPO_ROOT


def test_the_table_holds_every_setting_of_config_py_and_no_other():
    assert list(SETTINGS) == list(config_comments()), 'settings_table.SETTINGS must list config.py\'s settings, ' \
                                                      'in its order'
    assert set(config_comments()) == set(vars(build_config()))


def test_every_row_says_what_it_does_to_the_numbers():
    for name, row in SETTINGS.items():
        assert isinstance(row.changes_numbers, bool), name
        assert len(row.effect) > 5, f'{name}: say how it changes the numbers, or why it changes none'
        assert row.flags <= set(FLAGS), (name, row.flags - set(FLAGS))
        assert row.groups and set(row.groups) <= set(GROUPS), name
        if row.paper is not NO_PAPER_VALUE:
            assert row.changes_numbers, f'{name} has a paper value but changes no number'
        if 'resume' in row.flags and name != 'device':
            assert not row.changes_numbers, f'{name} changes numbers: --resume must refuse it'


def test_paper_values_have_config_types():
    defaults = config_defaults()
    for name, paper in paper_values().items():
        default = defaults[name]
        assert isinstance(paper, type(default)) or (isinstance(default, (tuple, list)) and isinstance(paper, tuple)), \
            (name, paper, default)


def test_default_run_declares_exactly_its_speed_deviations():
    # config.py keeps the paper's values except three speed settings, which every result states
    assert [name for name, _, _ in deviations_from_paper(build_config())] == \
        ['adam_fused', 'cache_test_features', 'channels_last']
    changed = build_config(val_fraction=0.2, max_grad_norm=1.0, weights_path='w.pth', num_workers=2)
    assert {'val_fraction', 'max_grad_norm', 'weights_path', 'num_workers'} <= \
        {name for name, _, _ in deviations_from_paper(changed)}


def test_setting_names_are_listed_in_one_module():
    """No module but the table (and config.py) holds a tuple, list or set of two or more setting names."""
    names = set(SETTINGS)
    offenders = []
    for path in glob.glob(os.path.join(REPO_ROOT, '*.py')) + glob.glob(os.path.join(REPO_ROOT, '*', '*.py')):
        relative = os.path.relpath(path, REPO_ROOT)
        if relative.startswith(('tests', 'benchmarks')) or relative in ('config.py', 'base/settings_table.py'):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                listed = [item.value for item in node.elts if isinstance(item, ast.Constant) and item.value in names]
                if len(listed) >= 2:
                    offenders.append((relative, node.lineno, listed))
    assert not offenders, f'setting names listed outside base/settings_table.py: {offenders}'


def test_derived_lists_follow_the_table():
    assert 'extract_batch_size' in FEATURE_CACHE_SETTINGS and 'extract_batch_size_cuda' in FEATURE_CACHE_SETTINGS
    assert set(CHECKPOINT_SETTINGS) >= set(names_in('model')) - {'pretrained', 'weights_path'}
    assert {'device', 'feature_cache_dir', 'verbose'} <= set(RESUMABLE_SETTINGS)
    assert 'lr_init' not in RESUMABLE_SETTINGS and 'num_workers' not in RESUMABLE_SETTINGS


def test_a_group_holds_only_its_settings():
    model = settings_group(build_config(fc_internal=32), 'model')
    assert type(model).__name__ == 'ModelSettings' and model.fc_internal == 32
    assert not hasattr(model, 'lr_init')
    with pytest.raises(AttributeError):
        model.fc_internal = 64  # read-only
    with pytest.raises(ValueError):
        settings_group(build_config(), 'nonsense')


def test_stored_config_holds_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stored = stored_config(build_config(dataset_path='data/x', feature_cache_dir='cache', weights_path=''))
    assert stored['dataset_path'] == str(tmp_path / 'data' / 'x')
    assert stored['feature_cache_dir'] == str(tmp_path / 'cache')
    assert stored['weights_path'] == ''  # unset stays unset


def test_resume_applies_what_changes_no_number_and_refuses_the_rest():
    saved = vars(build_config(cpu_flow_kernel='onednn'))
    config, lines = resumed_config(saved, {'device': 'cpu', 'num_workers': 0, 'feature_cache_dir': '/elsewhere',
                                           'verbose': False}, 'results/run')
    assert config.feature_cache_dir == '/elsewhere' and config.verbose is False
    assert config.cpu_flow_kernel == 'onednn'  # the run's own choice, not config.py's 'auto'
    assert any('feature_cache_dir' in line for line in lines) and not any('num_workers' in line for line in lines)
    with pytest.raises(UserError, match=r'--lr_init 0\.001 would change the numbers of the run in results/run'):
        resumed_config(saved, {'lr_init': 1e-3}, 'results/run')
    with pytest.raises(UserError, match='num_workers'):
        resumed_config(saved, {'num_workers': 2}, 'results/run')


def test_resume_compares_paths_as_stored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = stored_config(build_config(dataset_path='data'))
    config, _ = resumed_config(saved, {'dataset_path': 'data'}, 'results/run')  # the same folder, typed relative
    assert config.dataset_path == str(tmp_path / 'data')
    with pytest.raises(UserError, match='--dataset_path'):
        resumed_config(saved, {'dataset_path': 'other'}, 'results/run')


def test_resume_reports_settings_this_code_does_not_know(monkeypatch):
    import base.settings as settings
    saved = {**vars(build_config()), 'old_speed_flag': True}
    with pytest.raises(UserError, match='old_speed_flag'):
        resumed_config(saved, {}, 'results/run')  # unknown: it may have changed the numbers
    monkeypatch.setitem(settings.RETIRED_SETTINGS, 'old_speed_flag', (False, 'a speed-up that changed no number'))
    _, lines = resumed_config(saved, {}, 'results/run')
    assert any('old_speed_flag' in line and 'ignored' in line for line in lines)
    missing = vars(build_config())
    del missing['grad_map_viz']
    config, lines = resumed_config(missing, {}, 'results/run')  # a run from before a setting existed
    assert config.grad_map_viz is False and any('grad_map_viz' in line for line in lines)
