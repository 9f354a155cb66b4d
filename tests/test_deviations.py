"""Every number-changing setting is declared: compared with the paper's value, or listed with a reason."""
from paper_values import NUMBER_NEUTRAL_SETTINGS, PAPER_VALUES, SETTINGS_WITHOUT_PAPER_VALUE, deviations_from_paper
from settings import build_config, config_comments

GROUPS = {'paper_values.PAPER_VALUES': PAPER_VALUES, 'paper_values.NUMBER_NEUTRAL_SETTINGS': NUMBER_NEUTRAL_SETTINGS,
          'paper_values.SETTINGS_WITHOUT_PAPER_VALUE': SETTINGS_WITHOUT_PAPER_VALUE}


def test_every_setting_is_declared_exactly_once():
    settings = set(config_comments())
    assert settings == set(vars(build_config())), 'config_comments() must see every setting of config.py'
    undeclared = sorted(name for name in settings if not any(name in group for group in GROUPS.values()))
    assert not undeclared, (
        f'config.py settings {undeclared} are in none of {", ".join(GROUPS)}: add each to PAPER_VALUES with the '
        f'paper/official value if it can change a number, else to one of the other two with its reason')
    for name in settings:
        holders = [label for label, group in GROUPS.items() if name in group]
        assert len(holders) == 1, f'{name} is in {holders}; keep it in one'
    stale = sorted(name for group in GROUPS.values() for name in group if name not in settings)
    assert not stale, f'{stale} are declared but not in config.py'


def test_listed_settings_say_why():
    for group in (NUMBER_NEUTRAL_SETTINGS, SETTINGS_WITHOUT_PAPER_VALUE):
        for name, reason in group.items():
            assert isinstance(reason, str) and len(reason) > 10, name


def test_paper_values_have_config_types():
    defaults = vars(build_config())
    for name, paper in PAPER_VALUES.items():
        default = defaults[name]
        assert isinstance(paper, type(default)) or (isinstance(default, (tuple, list)) and isinstance(paper, tuple)), \
            (name, paper, default)


def test_default_run_declares_exactly_its_speed_deviations():
    # config.py keeps the paper's values except three speed settings, which every result states
    assert [name for name, _, _ in deviations_from_paper(build_config())] == \
        ['cache_test_features', 'adam_fused', 'channels_last']
    changed = build_config(val_fraction=0.2, max_grad_norm=1.0, weights_path='w.pth', num_workers=2)
    assert {'val_fraction', 'max_grad_norm', 'weights_path', 'num_workers'} <= \
        {name for name, _, _ in deviations_from_paper(changed)}
