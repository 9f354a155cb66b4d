"""DifferNet (Rudolph, Wandt, Rosenhahn, WACV 2021): train on defect-free images, report image AUROC.

    python main.py                                   # the demo set, paper settings
    python main.py --dataset_path ../shared/data/mvtec --class_name bottle
    python main.py --help                            # every setting of config.py, overridable here

The story: read config.py and the command line, then for each class find its images, build the network
with ImageNet AlexNet weights, train the flow, print the AUROC after every meta epoch, save results.json.
"""
import argparse
import ast
import datetime
import difflib
import os
import re
import sys
import types

import config as default_config
from utils import UserError

PAPER_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config.py')


def config_defaults():
    """{name: value} of config.py, in file order."""
    return {name: getattr(default_config, name) for name in config_comments()}


def config_comments():
    """{name: one-line comment} read from config.py, in file order."""
    comments = {}
    with open(PAPER_CONFIG_FILE) as handle:
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


class ConfigArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        match = re.search(r'unrecognized arguments: (--?[\w-]+)', message)
        if match:
            close = difflib.get_close_matches(match.group(1).lstrip('-'), config_defaults(), n=1)
            if close:
                message += f' (did you mean --{close[0]}?)'
        self.exit(2, f'{self.prog}: error: {message}\n')


def parse_command_line(argv):
    """Returns (config, other options). Every config.py value is an option `--name VALUE`."""
    parser = ConfigArgumentParser(
        prog='main.py', allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Train DifferNet and report image-level AUROC per meta epoch. '
                    'Every setting of config.py can be given here.')
    defaults = config_defaults()
    for name, comment in config_comments().items():
        default = defaults[name]

        def typed(text, default=default, name=name):
            try:
                return parse_value(text, default)
            except (ValueError, SyntaxError):
                raise argparse.ArgumentTypeError(
                    f"--{name} expects {type(default).__name__} like {default!r}, got '{text}'") from None
        parser.add_argument(f'--{name}', type=typed, default=default, metavar='VALUE',
                            help=f'{comment} (default: {default!r})')
    args = parser.parse_args(argv)
    return build_config(**{name: getattr(args, name) for name in defaults}), args


MIN_ALEXNET_INPUT = 63  # smaller inputs leave nothing after AlexNet's three max-pools
POSITIVE_INTEGERS = ('img_size', 'n_scales', 'n_coupling_blocks', 'fc_internal', 'meta_epochs', 'sub_epochs',
                     'n_transforms', 'n_transforms_test', 'batch_size', 'batch_size_test', 'extract_batch_size')


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
    if config.num_workers < 0:
        raise UserError(f'num_workers = {config.num_workers} must be 0 or more')
    if not class_names(config):
        raise UserError("class_name is empty; name a class folder, e.g. --class_name bottle")


def class_names(config):
    """The requested classes: one name, a comma-separated list (or a list in config.py), or 'all'."""
    from utils import class_folders
    names = config.class_name
    if isinstance(names, str):
        names = [name.strip() for name in names.split(',')]
    names = [name for name in names if name]
    if names == ['all']:
        if not os.path.isdir(config.dataset_path):
            raise UserError(f'dataset path {config.dataset_path} does not exist')
        names = class_folders(config.dataset_path)
        if not names:
            raise UserError(f'no class folders in {config.dataset_path}')
    return names


def run_seeds(config):
    return list(config.seeds) if config.seeds else [config.seed]


# The paper's values and the official code's behaviour; results.md lists every setting that differs.
PAPER_VALUES = dict(img_size=448, n_scales=3, n_coupling_blocks=8, clamp_alpha=3.0, fc_internal=2048, dropout=0.0,
                    lr_init=2e-4, adam_betas=(0.8, 0.8), adam_eps=1e-4, weight_decay=1e-5, meta_epochs=24,
                    sub_epochs=8, n_transforms=4, n_transforms_test=64, batch_size=24, batch_size_test=1,
                    transf_rotations=True, transf_brightness=0.0, transf_contrast=0.0, transf_saturation=0.0,
                    norm_mean=(0.485, 0.456, 0.406), norm_std=(0.229, 0.224, 0.225), fixed_test_rotations=False,
                    pretrained=True, train_feature_pool=0, cache_test_features=False, adam_fused=False,
                    channels_last=False, bf16_autocast=False)


def deviations_from_paper(config):
    """[(name, value, paper value)] for every setting that can change a number and differs."""
    def same(value, reference):
        return tuple(value) == reference if isinstance(reference, tuple) else value == reference
    return [(name, getattr(config, name), reference) for name, reference in PAPER_VALUES.items()
            if not same(getattr(config, name), reference)]


def fresh_results_dir(config):
    """`results_dir` if given (created), else results/<date>_<time>_<classes>, never an existing one."""
    if config.results_dir:
        os.makedirs(config.results_dir, exist_ok=True)
        return config.results_dir
    stamp = datetime.datetime.now().strftime('%Y%m%d_%H%M%S')
    base = os.path.join('results', f"{stamp}_{'_'.join(class_names(config))[:60]}")
    path, suffix = base, 1
    while os.path.exists(path):
        suffix += 1
        path = f'{base}_{suffix}'
    os.makedirs(path)
    return path


def run_class(config, class_name, device):
    """Trains and evaluates one class with `config.seed`; returns its results entry."""
    from model import build_model
    from train import train_class
    from utils import check_images_readable, defect_type_aurocs, detect_layout, find_class_samples, seed_everything

    train_samples, test_samples = find_class_samples(config.dataset_path, class_name)
    check_images_readable([sample.path for sample in train_samples + test_samples])
    layout = detect_layout(os.path.join(config.dataset_path, class_name))
    print(f'\n=== {class_name} (seed {config.seed}, {layout} layout): ' + workload_text(config, train_samples, test_samples)
          + f', device {device}', flush=True)
    seed_everything(config.seed)
    model, weights_source = build_model(config)
    print(f'AlexNet weights: {weights_source}', flush=True)
    history = train_class(model, train_samples, test_samples, config, device,
                          log=lambda line: print(line, flush=True))
    defect_types = [sample.defect_type for sample in test_samples]
    return dict(
        class_name=class_name, seed=config.seed, layout=layout, weights_source=weights_source,
        n_train_images=len(train_samples), n_test_images=len(test_samples), **history,
        test_files=[os.path.relpath(sample.path, config.dataset_path) for sample in test_samples],
        test_defect_types=defect_types,
        test_mask_files=[sample.mask_path and os.path.relpath(sample.mask_path, config.dataset_path)
                         for sample in test_samples],
        defect_type_auroc_last=defect_type_aurocs(defect_types, history['test_labels'], history['test_scores']),
        defect_type_auroc_best=defect_type_aurocs(defect_types, history['test_labels'], history['best_test_scores']))


def workload_text(config, train_samples, test_samples):
    """How many images, views and steps a class takes, said before it starts."""
    n_train, n_test = len(train_samples), len(test_samples)
    n_anomalous = sum(sample.label for sample in test_samples)
    steps = config.meta_epochs * config.sub_epochs * -(-n_train // config.batch_size)
    if config.train_feature_pool:
        train_views = f'{n_train * config.train_feature_pool} training views extracted once (pool of {config.train_feature_pool})'
    else:
        train_views = f'{config.meta_epochs * config.sub_epochs * n_train * config.n_transforms} training views on-line'
    test_passes = 1 if config.cache_test_features else config.meta_epochs
    return (f'{n_train} training images, {n_test} test images ({n_anomalous} anomalous); {train_views}, '
            f'{test_passes * n_test * config.n_transforms_test} test views extracted ({n_test} x '
            f'{config.n_transforms_test}{"" if test_passes == 1 else f" x {test_passes} meta epochs"}); '
            f'{steps} flow steps ({config.meta_epochs} x {config.sub_epochs} epochs x {-(-n_train // config.batch_size)})')


def run(config):
    """Runs every requested (class, seed); returns (results folder, number of failed runs)."""
    from utils import (DEMO_CLASS, DEMO_DATASET_PATH, ensure_demo_dataset, find_class_samples, resolve_device,
                       results_markdown, write_results_files)

    validate_config(config)
    device = resolve_device(config.device)
    if os.path.normpath(config.dataset_path) == DEMO_DATASET_PATH and ensure_demo_dataset(DEMO_DATASET_PATH):
        print(f'Generated the demo dataset in {DEMO_DATASET_PATH}/{DEMO_CLASS}')
    names = class_names(config)
    problems = {}
    for class_name in names:  # a mistyped class fails now, not after hours of another
        try:
            find_class_samples(config.dataset_path, class_name)
        except UserError as error:
            problems[class_name] = str(error)
    if len(problems) == len(names):
        raise UserError(next(iter(problems.values())) if len(names) == 1 else
                        'no class can run: ' + '; '.join(problems.values()))
    results_dir = fresh_results_dir(config)
    deviations = deviations_from_paper(config)
    results = {'config': vars(config), 'seeds': run_seeds(config), 'classes': [], 'failed': []}
    for class_name in names:
        if class_name in problems:
            print(f'error: class {class_name} skipped: {problems[class_name]}', flush=True)
            results['failed'].append({'class_name': class_name, 'seed': None, 'error': problems[class_name]})
            write_results_files(results_dir, results, deviations)
            continue
        for seed in run_seeds(config):
            try:
                results['classes'].append(run_class(build_config(**{**vars(config), 'seed': seed}), class_name, device))
            except UserError as error:
                print(f'error: class {class_name} (seed {seed}) failed: {error}', flush=True)
                results['failed'].append({'class_name': class_name, 'seed': seed, 'error': str(error)})
            write_results_files(results_dir, results, deviations)
    print('\n' + results_markdown(results, deviations))
    print(f'Results: {results_dir}/ (results.json, results.md, results.csv, auroc.png, per-class scores and plots)')
    return results_dir, len(results['failed'])


def main(argv=None):
    try:
        config, _ = parse_command_line(sys.argv[1:] if argv is None else argv)
        _, n_failed = run(config)
    except UserError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    if n_failed:
        print(f'error: {n_failed} run(s) failed; see above and results.md', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
