"""The configuration of a run: config.py's values and comments, a value typed on the command line, checks,
the typed groups functions receive, the run's deviations from the paper, and what --resume may change.

What the code knows about each setting is in settings_table.py. Imports no torch: `python main.py --help` and
every user error stay fast.
"""
import ast
import difflib
import functools
import os
import re
import types
import typing

import config as default_config
from base.errors import UserError
from base.settings_table import (AUTO_SETTINGS, GROUPS, PATH_SETTINGS, PER_RUN_SETTINGS,  # noqa: F401
                                 POSITIVE_INTEGERS, RESUMABLE_SETTINGS, RETIRED_SETTINGS, SETTINGS, names_in,
                                 paper_values)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO_ROOT, 'config.py')
VIEW_BACKENDS = ('auto', 'pil', 'tensor')
FLOW_KERNELS = ('auto', 'default', 'onednn')
MIN_ALEXNET_INPUT = 63  # smaller inputs leave nothing after AlexNet's three max-pools


def same_value(value, other):
    """Whether two values of a setting are equal, a list and a tuple of the same items alike (config.py and
    the command line give tuples; JSON files and checkpoints hold lists)."""
    def plain(item):
        return list(item) if isinstance(item, (list, tuple)) else item
    return plain(value) == plain(other)


def config_defaults():
    """{name: value} of config.py, in file order."""
    return {name: getattr(default_config, name) for name in config_comments()}


def config_comments():
    """{name: one-line comment} read from config.py, in file order."""
    comments = {}
    with open(CONFIG_FILE) as handle:
        for line in handle:
            match = re.match(r'^(\w+) = .*?  # (.*)$', line.rstrip('\n'))
            if match:
                comments[match.group(1)] = match.group(2)
    return comments


def build_config(**overrides):
    """The effective configuration: config.py's values with `overrides` on top (tests build tiny ones).

    Raises UserError for a name config.py does not have.
    """
    values = config_defaults()
    for name, value in overrides.items():
        if name not in values:
            close = difflib.get_close_matches(name, values, n=1)
            hint = f' (did you mean {close[0]}?)' if close else ''
            raise UserError(f"unknown setting '{name}'{hint}; see python main.py --help")
        values[name] = value
    return types.SimpleNamespace(**values)


def parse_value(text, default):
    """Parses a command-line string as the type of the config default it replaces."""
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ('true', '1', 'yes', 'on'):
            return True
        if lowered in ('false', '0', 'no', 'off'):
            return False
        raise ValueError('expected true or false')
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, (tuple, list)):
        items = [item for item in text.replace('(', '').replace(')', '').split(',') if item.strip()]
        element_type = type(default[0]) if default else int
        return tuple(element_type(ast.literal_eval(item.strip())) for item in items)
    return text


def validate_config(config):
    """Raises UserError for values that cannot work, naming the value and the fix."""
    for name in POSITIVE_INTEGERS:
        if getattr(config, name) < 1:
            raise UserError(f'{name} = {getattr(config, name)} must be at least 1')
    smallest = config.img_size // 2 ** (config.n_scales - 1)
    if smallest < MIN_ALEXNET_INPUT:
        raise UserError(f'img_size {config.img_size} with n_scales {config.n_scales} makes a smallest scale of '
                        f'{smallest} px; AlexNet needs at least {MIN_ALEXNET_INPUT}: raise img_size or lower n_scales')
    if not 0 <= config.dropout < 1:
        raise UserError(f'dropout = {config.dropout} must be in [0, 1)')
    if config.train_feature_pool and config.train_feature_pool < config.n_transforms:
        raise UserError(f'train_feature_pool = {config.train_feature_pool} is below n_transforms = '
                        f'{config.n_transforms}; use 0 (on-line views) or at least {config.n_transforms}')
    if config.n_train_images < 0:
        raise UserError(f'n_train_images = {config.n_train_images} must be 0 (all) or a number of images, e.g. 16')
    if not 0 <= config.val_fraction < 1:
        raise UserError(f'val_fraction = {config.val_fraction} must be in [0, 1), e.g. 0.1')
    validate_threshold_fpr(config)
    if config.view_backend not in VIEW_BACKENDS:
        raise UserError(f"view_backend = '{config.view_backend}' must be auto, pil or tensor")
    if config.cpu_flow_kernel not in FLOW_KERNELS:
        raise UserError(f"cpu_flow_kernel = '{config.cpu_flow_kernel}' must be auto, default or onednn")
    if config.num_workers < 0:
        raise UserError(f'num_workers = {config.num_workers} must be 0 or more')
    if config.bf16_autocast not in (True, False, 'auto'):
        raise UserError(f"bf16_autocast = {config.bf16_autocast!r} must be true, false or 'auto'")
    if not requested_class_names(config):
        raise UserError("class_name is empty; name a class folder, e.g. --class_name bottle")


def validate_threshold_fpr(config):
    if not 0 <= config.threshold_fpr < 1:
        raise UserError(f'threshold_fpr = {config.threshold_fpr} must be in [0, 1), e.g. 0.01')


def requested_class_names(config):
    """The class names as given: one name, a comma-separated list (or a list in config.py), or ['all']."""
    names = config.class_name
    if isinstance(names, str):
        names = [name.strip() for name in names.split(',')]
    return [name for name in names if name]


def run_seeds(config):
    """The seeds of a run: `seeds` when given, else the one `seed`."""
    return list(config.seeds) if config.seeds else [config.seed]


def with_values(config, **changes):
    """A copy of `config` with `changes` (names config.py has)."""
    return build_config(**{**vars(config), **changes})


def settings_group(config, group):
    """The typed group `group` (settings_table.GROUPS) of `config`: a read-only record of just its settings,
    what a function that needs only those receives."""
    return group_type(group)(**{name: getattr(config, name) for name in names_in(group)})


@functools.cache
def group_type(group):
    """The NamedTuple class of a group, ModelSettings for 'model', its fields typed as config.py's values."""
    if group not in GROUPS:
        raise ValueError(f'{group!r} is not a settings group; one of {GROUPS}')
    defaults = config_defaults()
    return typing.NamedTuple(f'{group.title()}Settings', [(name, type(defaults[name])) for name in names_in(group)])


def deviations_from_paper(config):
    """[(name, value, paper value)] for every setting that can change a number and differs from the paper's."""
    return [(name, getattr(config, name), reference) for name, reference in paper_values().items()
            if not same_value(getattr(config, name), reference)]


def stored_config(config):
    """{name: value} of `config` as results.json keeps it: path settings absolute, so that --resume works from
    any working directory."""
    values = dict(vars(config))
    for name in PATH_SETTINGS:
        if values.get(name):
            values[name] = os.path.abspath(values[name])
    return values


def job_number_settings(config):
    """{name: value} of the settings that decide the numbers of one (class, seed) job and that --resume may not
    change, paths absolute as stored_config keeps them: what a resume state must have been computed with."""
    values = stored_config(config)
    return {name: values[name] for name, row in SETTINGS.items()
            if row.changes_numbers and name not in RESUMABLE_SETTINGS and name not in PER_RUN_SETTINGS}


def resumed_config(saved, given, results_dir):
    """(config, lines saying what changed) for `--resume results_dir`: the run's saved values `saved`, with the
    options `given` on the command line now ({name: value}) applied where they change no number.

    Raises UserError naming the first option that would change the numbers, or a saved setting unknown to
    this code that may have (settings_table.RETIRED_SETTINGS says which retired ones did not).
    """
    defaults, values, lines = config_defaults(), {}, []
    for name, value in saved.items():
        if name in defaults:
            values[name] = value
            continue
        changes_numbers, why = RETIRED_SETTINGS.get(name, (True, 'unknown to this code'))
        if changes_numbers:
            raise UserError(f"the run in {results_dir} has setting {name} = {value!r}, which this code's config.py "
                            f'does not have ({why}) and which may change its numbers; continue it with the code '
                            f'that started it, or start a new run')
        lines.append(f'resume: setting {name} = {value!r} of the run is no longer in config.py ({why}); ignored')
    for name in defaults:
        if name not in values:
            values[name] = defaults[name]
            lines.append(f'resume: setting {name} is newer than the run; it takes its default {defaults[name]!r}')
    for name, value in given.items():
        if name in PATH_SETTINGS and value:
            value = os.path.abspath(value)  # as the run stored it
        if same_value(value, values[name]):
            continue
        if name not in RESUMABLE_SETTINGS:
            raise UserError(f'--{name} {value!r} would change the numbers of the run in {results_dir} (it ran with '
                            f'{values[name]!r}; {name}: {SETTINGS[name].effect}); resume without it, or start a '
                            f'new run')
        lines.append(f'resume: {name} {values[name]!r} -> {value!r} ({SETTINGS[name].effect})')
        values[name] = value
    return build_config(**values), lines
