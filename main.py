"""DifferNet (Rudolph, Wandt, Rosenhahn, WACV 2021): train on defect-free images, report image AUROC.

    python main.py                                   # the demo set, paper settings
    python main.py --dataset_path ../shared/data/mvtec --class_name bottle
    python main.py --help                            # every setting of config.py, overridable here
    python main.py --score IMAGE_OR_FOLDER ... --checkpoint results/RUN/bottle_checkpoint.pt

The story: read config.py and the command line, then for each class find its images, build the network
with ImageNet AlexNet weights, train the flow, print the AUROC after every meta epoch, save results.json
and the class's checkpoint (and, with grad_map_viz, its gradient maps). With --score, load a checkpoint
instead and score new images against a threshold (scoring.py).
"""
import argparse
import ast
import datetime
import difflib
import json
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
        return tuple(type(default[0])(ast.literal_eval(item.strip())) for item in items)
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
    scoring = parser.add_argument_group('scoring new images (instead of training)')
    scoring.add_argument('--score', nargs='+', metavar='PATH', help='image files or folders (searched recursively)')
    scoring.add_argument('--checkpoint', metavar='FILE', help='a <class>_checkpoint.pt of a run, or an official '
                         'save_weights state dict (then img_size etc. come from the settings above)')
    scoring.add_argument('--threshold', type=float, metavar='X', help='anomalous when score > X (default: the '
                         'score at threshold_fpr on the defect-free images the checkpoint holds)')
    scoring.add_argument('--score_out', default='scores.csv', metavar='CSV', help='where the scores go (default: scores.csv)')
    scoring.add_argument('--maps', default='', metavar='DIR', help='also write a gradient-map PNG per image into DIR')
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
    if not 0 <= config.val_fraction < 1:
        raise UserError(f'val_fraction = {config.val_fraction} must be in [0, 1), e.g. 0.1')
    validate_threshold_fpr(config)
    if config.train_feature_pool and config.train_feature_pool < config.n_transforms:
        raise UserError(f'train_feature_pool = {config.train_feature_pool} is below n_transforms = '
                        f'{config.n_transforms}; use 0 (on-line views) or at least {config.n_transforms}')
    if config.num_workers < 0:
        raise UserError(f'num_workers = {config.num_workers} must be 0 or more')
    if not class_names(config):
        raise UserError("class_name is empty; name a class folder, e.g. --class_name bottle")


def validate_threshold_fpr(config):
    if not 0 <= config.threshold_fpr < 1:
        raise UserError(f'threshold_fpr = {config.threshold_fpr} must be in [0, 1), e.g. 0.01')


def class_names(config):
    names = config.class_name
    if isinstance(names, str):
        names = [name.strip() for name in names.split(',')]
    return [name for name in names if name]


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


def write_json_atomic(path, data):
    with open(path + '.part', 'w') as handle:
        json.dump(data, handle, indent=2)
    os.replace(path + '.part', path)


def run_class(config, class_name, device, results_dir):
    """Trains and evaluates one class, saves its checkpoint(s) and, with grad_map_viz, its gradient maps;
    returns its results entry."""
    from model import build_model
    from train import train_class
    from utils import check_images_readable, find_class_samples, seed_everything, split_validation

    train_samples, test_samples = find_class_samples(config.dataset_path, class_name)
    check_images_readable([path for path, _, _ in train_samples + test_samples])
    train_samples, val_samples = split_validation(train_samples, config.val_fraction, config.seed)
    n_anomalous = sum(label for _, label, _ in test_samples)
    held_out = f' ({len(val_samples)} more held out for the threshold)' if val_samples else ''
    print(f'\n=== {class_name}: {len(train_samples)} training images{held_out} x {config.n_transforms} views, '
          f'{len(test_samples)} test images ({n_anomalous} anomalous) x {config.n_transforms_test} views, '
          f'{config.meta_epochs} x {config.sub_epochs} epochs, device {device}', flush=True)
    seed_everything(config.seed)
    model, weights_source = build_model(config)
    print(f'AlexNet weights: {weights_source}', flush=True)
    save = checkpoint_saver(model, config, weights_source, class_name, train_samples, val_samples, device)
    best_path = os.path.join(results_dir, f'{class_name}_best.pt')

    def on_meta_epoch(meta_epoch, history, scores, is_new_max):
        if config.save_best and is_new_max:
            save(best_path, dict(history, meta_epoch=meta_epoch))
            print(f'Best checkpoint (meta epoch {meta_epoch}): {best_path}', flush=True)

    history = train_class(model, train_samples, test_samples, config, device,
                          log=lambda line: print(line, flush=True), on_meta_epoch=on_meta_epoch)
    history['test_files'] = [os.path.relpath(path, config.dataset_path) for path, _, _ in test_samples]
    entry = dict(class_name=class_name, weights_source=weights_source, n_train_images=len(train_samples),
                 n_validation_images=len(val_samples), n_test_images=len(test_samples), **history)
    checkpoint_path = os.path.join(results_dir, f'{class_name}_checkpoint.pt')
    save(checkpoint_path, entry)
    print(f'Checkpoint: {checkpoint_path}', flush=True)
    entry['checkpoint'] = checkpoint_path
    if config.grad_map_viz:
        from localization import localize_class
        entry.update(localize_class(model, test_samples, config, device,
                                    os.path.join(results_dir, 'maps', class_name),
                                    log=lambda line: print(line, flush=True)))
    return entry


def checkpoint_saver(model, config, weights_source, class_name, train_samples, val_samples, device):
    """save(path, history): writes the checkpoint of `model` as it is now, with the score statistics of
    the training (and validation) images at the fixed rotations. Their features are extracted at the
    first save only; later saves rerun just the flow."""
    import torch
    from model import save_checkpoint
    from scoring import reference_view_features, score_statistics, scores_of_features

    references = {'training': train_samples, 'validation': val_samples}
    features = {}

    def save(path, history):
        if not features:
            # the data loaders draw a seed from torch's global generator: fork it, so that training runs
            # the same random stream whether or not (and whenever) a checkpoint is saved
            with torch.random.fork_rng(devices=[]):
                for name, samples in references.items():
                    if samples:
                        features[name] = reference_view_features(model, samples, config, device,
                                                                 f'{name} reference views')
        statistics = {name: None for name in references}
        for name, samples in references.items():
            if samples:
                files = [os.path.relpath(file, config.dataset_path) for file, _, _ in samples]
                statistics[name] = score_statistics(scores_of_features(model, features[name], config), files)
        save_checkpoint(path, model, config, weights_source, history, statistics, class_name)

    return save


def summary_table(results):
    """Markdown table of the image AUROCs, and of the pixel AUROC when gradient maps were made."""
    with_pixels = any('pixel_auroc' in entry for entry in results)
    header = '| Class | Last AUROC | Max AUROC | Max AUROC Epoch |'
    lines = [header + (' Pixel AUROC (ours, not in the paper) |' if with_pixels else ''),
             '|---|---|---|---|' + ('---|' if with_pixels else '')]
    for entry in results:
        line = (f"| {entry['class_name']} | {entry['last_auroc']:.4f} | {entry['max_auroc']:.4f} "
                f"| {entry['max_auroc_epoch']} |")
        if with_pixels:
            pixel = entry.get('pixel_auroc')
            line += f' {pixel:.4f} |' if pixel is not None else ' no masks |'
        lines.append(line)
    return '\n'.join(lines)


def run(config):
    """Runs every requested class; returns the results folder."""
    from utils import DEMO_CLASS, DEMO_DATASET_PATH, ensure_demo_dataset, find_class_samples, resolve_device

    validate_config(config)
    device = resolve_device(config.device)
    if os.path.normpath(config.dataset_path) == DEMO_DATASET_PATH and ensure_demo_dataset(DEMO_DATASET_PATH):
        print(f'Generated the demo dataset in {DEMO_DATASET_PATH}/{DEMO_CLASS}')
    for class_name in class_names(config):  # a mistyped class fails now, not after hours of another
        find_class_samples(config.dataset_path, class_name)
    results_dir = fresh_results_dir(config)
    results = {'config': vars(config), 'classes': []}
    for class_name in class_names(config):
        results['classes'].append(run_class(config, class_name, device, results_dir))
        write_json_atomic(os.path.join(results_dir, 'results.json'), results)
    print('\n' + summary_table(results['classes']))
    print(f'\nResults: {os.path.join(results_dir, "results.json")}')
    return results_dir


def score(config, args):
    """The --score command (scoring.score_images), after checking its options go together."""
    from scoring import score_images
    if not args.score or not args.checkpoint:
        raise UserError('--score PATH... and --checkpoint FILE go together, e.g. '
                        '--score data/new_parts --checkpoint results/RUN/bottle_checkpoint.pt')
    validate_threshold_fpr(config)
    score_images(config, args.score, args.checkpoint, threshold=args.threshold, score_out=args.score_out,
                 maps_dir=args.maps, log=lambda line: print(line, flush=True))


def main(argv=None):
    try:
        config, args = parse_command_line(sys.argv[1:] if argv is None else argv)
        if args.score or args.checkpoint:
            score(config, args)
        else:
            run(config)
    except UserError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
