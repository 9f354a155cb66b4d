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
import signal
import sys
import traceback
import types

import config as default_config

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
    from utils import UserError
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


AUTO_SETTINGS = ('bf16_autocast',)  # true/false settings that also take 'auto' (decided per device at the start)


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
            if name in AUTO_SETTINGS and text.strip().lower() == 'auto':
                return 'auto'
            try:
                return parse_value(text, default)
            except (ValueError, SyntaxError):
                raise argparse.ArgumentTypeError(
                    f"--{name} expects {type(default).__name__} like {default!r}, got '{text}'") from None
        parser.add_argument(f'--{name}', type=typed, default=default, metavar='VALUE',
                            help=f'{comment} (default: {default!r})')
    parser.add_argument('--resume', metavar='RESULTS_DIR', default='',
                        help='continue an interrupted run exactly where it stopped, with its own config and seeds')
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
                     'n_transforms', 'n_transforms_test', 'batch_size', 'batch_size_test', 'extract_batch_size',
                     'extract_batch_size_cuda')


def validate_config(config):
    """Raises UserError for values that cannot work, naming the value and the fix."""
    from utils import VIEW_BACKENDS, UserError
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
    if not 0 <= config.val_fraction < 1:
        raise UserError(f'val_fraction = {config.val_fraction} must be in [0, 1), e.g. 0.1')
    validate_threshold_fpr(config)
    if config.view_backend not in VIEW_BACKENDS:
        raise UserError(f"view_backend = '{config.view_backend}' must be auto, pil or tensor")
    if config.num_workers < 0:
        raise UserError(f'num_workers = {config.num_workers} must be 0 or more')
    if config.bf16_autocast not in (True, False, 'auto'):
        raise UserError(f"bf16_autocast = {config.bf16_autocast!r} must be true, false or 'auto'")
    if not class_names(config):
        raise UserError("class_name is empty; name a class folder, e.g. --class_name bottle")


def validate_threshold_fpr(config):
    from utils import UserError
    if not 0 <= config.threshold_fpr < 1:
        raise UserError(f'threshold_fpr = {config.threshold_fpr} must be in [0, 1), e.g. 0.01')


def class_names(config):
    """The requested classes: one name, a comma-separated list (or a list in config.py), or 'all'."""
    from utils import UserError, class_folders
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
# Every setting of config.py is in exactly one of PAPER_VALUES, NUMBER_NEUTRAL_SETTINGS and
# SETTINGS_WITHOUT_PAPER_VALUE (tests/test_deviations.py): a setting that can change a number and has a
# paper/official value is compared with it and printed with every result when it differs.
PAPER_VALUES = dict(img_size=448, n_scales=3, n_coupling_blocks=8, clamp_alpha=3.0, fc_internal=2048, dropout=0.0,
                    lr_init=2e-4, adam_betas=(0.8, 0.8), adam_eps=1e-4, weight_decay=1e-5, meta_epochs=24,
                    sub_epochs=8, n_transforms=4, n_transforms_test=64, batch_size=24, batch_size_test=1,
                    transf_rotations=True, transf_brightness=0.0, transf_contrast=0.0, transf_saturation=0.0,
                    norm_mean=(0.485, 0.456, 0.406), norm_std=(0.229, 0.224, 0.225), fixed_test_rotations=False,
                    pretrained=True, train_feature_pool=0, cache_test_features=False, adam_fused=False,
                    channels_last=False, bf16_autocast=False, val_fraction=0.0, max_grad_norm=0.0, weights_path='',
                    num_workers=0)

# settings that cannot change any number a run computes (losses, scores, AUROC, checkpoint contents)
NUMBER_NEUTRAL_SETTINGS = {
    'results_dir': 'where results are written',
    'verbose': 'what is printed',
    'hide_tqdm_bar': 'progress bars only',
    'feature_cache': 'a cached tensor is the extracted one, bit for bit, and its views come from a forked '
                     'random stream either way',
    'feature_cache_dir': 'where that cache lives',
    'save_best': 'one more checkpoint file; its reference views fork the random stream',
    'save_checkpoint': 'writes the checkpoint at the end of a job; its reference views fork the random stream',
    'view_backend': 'PIL or tensor views are the same pixels from the same random numbers (tests/test_device_views.py)',
    'resume_state': 'writes the --resume state; draws no random numbers',
    'resume_interval_s': 'how often that state is written',
    'grad_map_viz': 'runs after training and adds maps and a pixel AUROC; changes none of the image-level numbers',
}

# settings that change numbers but have no paper/official value to compare with; each is stated with
# every result (printed, and in results.json's config)
SETTINGS_WITHOUT_PAPER_VALUE = {
    'dataset_path': 'which data is measured',
    'class_name': 'which classes are measured',
    'seed': 'which random stream; the paper states none',
    'seeds': 'which random streams',
    'device': 'float rounding differs between CPU and GPU (official: a CUDA GPU)',
    'extract_batch_size': 'views per AlexNet pass: float rounding only (batch 1 vs 16 differ by up to 2e-7); '
                          'the official code passes a batch\'s 96 training views or an image\'s 64 test views at once',
    'extract_batch_size_cuda': 'the same on a CUDA device',
    'max_reference_images': 'the checkpoint\'s score statistics and --score threshold (ours; not in the paper)',
    'threshold_fpr': 'the --score threshold (ours; not in the paper)',
}


def deviations_from_paper(config):
    """[(name, value, paper value)] for every setting that can change a number and differs."""
    def same(value, reference):
        return tuple(value) == reference if isinstance(reference, tuple) else value == reference
    return [(name, getattr(config, name), reference) for name, reference in PAPER_VALUES.items()
            if not same(getattr(config, name), reference)]


def fresh_results_dir(config):
    """`results_dir` if given (created; refused if an earlier run wrote there), else
    results/<date>_<time>_<classes>; never an existing run's folder."""
    from utils import UserError
    if config.results_dir:
        if os.path.isfile(os.path.join(config.results_dir, 'results.json')):
            raise UserError(f'results_dir {config.results_dir} holds an earlier run; choose another folder, '
                            f'or continue it with --resume {config.results_dir}')
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


def load_run_to_resume(results_dir):
    """(config, results) of the run in `results_dir`, for --resume."""
    from utils import UserError, read_json
    path = os.path.join(results_dir, 'results.json')
    if not os.path.isfile(path):
        raise UserError(f'nothing to resume in {results_dir}: no results.json there; give the folder a run printed')
    results = read_json(path)
    return build_config(**results['config']), results


def run_class(config, class_name, device, results_dir, on_meta_epoch=None, resume_path=None):
    """Trains and evaluates one class with `config.seed`, saves its checkpoint (with save_checkpoint) and
    with grad_map_viz its gradient maps and pixel metrics; returns its results entry.

    A NaN/inf loss returns the entry of the meta epochs finished before, with `status` 'diverged'.
    """
    from model import build_model
    from train import TrainingDiverged, train_class
    from utils import detect_layout, find_class_samples, scan_class, seed_everything, split_validation

    train_samples, test_samples = find_class_samples(config.dataset_path, class_name)
    for warning in scan_class(config.dataset_path, class_name, train_samples, test_samples):
        print(f'warning: {warning}', flush=True)
    train_samples, val_samples = split_validation(train_samples, config.val_fraction, config.seed)
    layout = detect_layout(os.path.join(config.dataset_path, class_name))
    held_out = f' ({len(val_samples)} more held out for the --score threshold)' if val_samples else ''
    print(f'\n=== {class_name} (seed {config.seed}, {layout} layout): ' + workload_text(config, train_samples, test_samples)
          + f'{held_out}, device {device}', flush=True)
    seed_everything(config.seed)
    model, weights_source = build_model(config)
    print(f'AlexNet weights: {weights_source}', flush=True)
    stem = f'{class_name}_seed{config.seed}' if len(run_seeds(config)) > 1 else class_name
    save = checkpoint_saver(model, config, weights_source, class_name, train_samples, val_samples, device)
    best_path = os.path.join(results_dir, f'{stem}_best.pt')

    def after_meta_epoch(meta_epoch, history, scores, is_new_max):
        if config.save_best and is_new_max:
            save(best_path, dict(history, meta_epoch=meta_epoch))
            print(f'Best checkpoint (meta epoch {meta_epoch}): {best_path}', flush=True)
        if on_meta_epoch is not None:
            on_meta_epoch(class_entry(config, class_name, layout, weights_source, train_samples, test_samples,
                                      history, 'in progress'))

    status, error = 'done', None
    try:
        history = train_class(model, train_samples, test_samples, config, device,
                              log=lambda line: print(line, flush=True), resume_path=resume_path,
                              on_meta_epoch=after_meta_epoch)
    except TrainingDiverged as diverged:
        history, status, error = diverged.history, 'diverged', str(diverged)
        print(f'error: class {class_name} stopped: {error}', flush=True)
    entry = class_entry(config, class_name, layout, weights_source, train_samples, test_samples, history, status)
    entry['n_validation_images'] = len(val_samples)
    if status == 'done':
        if config.save_checkpoint:  # off, the reference views are never extracted either
            checkpoint_path = os.path.join(results_dir, f'{stem}_checkpoint.pt')
            save(checkpoint_path, history)
            print(f'Checkpoint: {checkpoint_path}', flush=True)
            entry['checkpoint'] = os.path.basename(checkpoint_path)
        if config.grad_map_viz:
            from localization import localize_class
            entry.update(localize_class(model, test_samples, config, device, os.path.join(results_dir, 'maps', stem),
                                        log=lambda line: print(line, flush=True)))
    entry['peak_rss_gib'] = round(peak_resident_gib(), 2)
    if error:
        entry['error'] = error
    return entry


def checkpoint_saver(model, config, weights_source, class_name, train_samples, val_samples, device):
    """save(path, history): writes the checkpoint of `model` as it is now, with the score statistics of
    defect-free images at the fixed rotations: the validation images, and `max_reference_images` of the
    training images (evenly spaced in sorted order; 0 = all). Their features are extracted at the first
    save only; later saves rerun just the flow."""
    from model import save_checkpoint
    from train import reference_view_features, scores_of_features
    from utils import score_statistics

    if config.max_reference_images and len(train_samples) > config.max_reference_images:
        step = len(train_samples) / config.max_reference_images
        train_samples = [train_samples[int(i * step)] for i in range(config.max_reference_images)]
    references = {'training': train_samples, 'validation': val_samples}
    features = {}

    def save(path, history):
        if not features:
            # train.fixed_view_features leaves torch's random stream as it was, so training runs the same
            # whether or not (and whenever) a checkpoint is saved
            for name, samples in references.items():
                if samples:
                    features[name] = reference_view_features(model, samples, config, device,
                                                             f'{name} reference views')
        statistics = {name: None for name in references}
        for name, samples in references.items():
            if samples:
                files = [os.path.relpath(sample.path, config.dataset_path) for sample in samples]
                statistics[name] = score_statistics(scores_of_features(model, features[name], config), files)
        save_checkpoint(path, model, config, weights_source, history, statistics, class_name)

    return save


def peak_resident_gib():
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 30 if sys.platform == 'darwin' else peak / 2 ** 20


def class_entry(config, class_name, layout, weights_source, train_samples, test_samples, history, status):
    """The results.json entry of one (class, seed) run, from its training history."""
    from utils import defect_type_aurocs
    defect_types = [sample.defect_type for sample in test_samples]
    entry = dict(class_name=class_name, seed=config.seed, status=status, layout=layout,
                 weights_source=weights_source, n_train_images=len(train_samples),
                 n_test_images=len(test_samples), **history,
                 test_files=[os.path.relpath(sample.path, config.dataset_path) for sample in test_samples],
                 test_defect_types=defect_types,
                 test_mask_files=[sample.mask_path and os.path.relpath(sample.mask_path, config.dataset_path)
                                  for sample in test_samples])
    if history.get('test_scores'):
        entry['defect_type_auroc_last'] = defect_type_aurocs(defect_types, history['test_labels'],
                                                             history['test_scores'])
        entry['defect_type_auroc_best'] = defect_type_aurocs(defect_types, history['test_labels'],
                                                             history['best_test_scores'])
    return entry


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


OUT_OF_MEMORY_HINT = ('out of memory on {device} in class {class_name}: lower batch_size ({batch_size}), '
                      'extract_batch_size ({extract_batch_size}), n_transforms_test ({n_transforms_test}) '
                      'or train_feature_pool ({train_feature_pool}), or use --device cpu')


def is_out_of_memory(error):
    return isinstance(error, MemoryError) or 'out of memory' in str(error).lower() or \
        "can't allocate memory" in str(error).lower()


def run_job(config, class_name, seed, device, results_dir, record, on_progress=None, catch_all=False):
    """Runs one (class, seed) job; calls record(entry or None, failure or None) when it ends, then removes
    its resume state (which has served). A failure is {class_name, seed, error}; a diverged run has both.

    User errors and out-of-memory fail the job; other exceptions do too with `catch_all` (a sweep goes on
    with the other jobs), else they propagate. KeyboardInterrupt always propagates, keeping the resume state.
    """
    from utils import UserError, remove_stale_temporaries
    seed_config = build_config(**{**vars(config), 'seed': seed})
    state_path = None
    if config.resume_state:
        os.makedirs(os.path.join(results_dir, 'resume'), exist_ok=True)
        state_path = os.path.join(results_dir, 'resume', f'{class_name}_seed{seed}.pt')
    entry = message = None
    out_of_memory = False
    try:
        entry = run_class(seed_config, class_name, device, results_dir, on_progress, state_path)
        if entry['status'] != 'done':
            message = entry['error']
    except Exception as error:  # MemoryError included
        if isinstance(error, UserError):
            message = str(error)
            print(f'error: class {class_name} (seed {seed}) failed: {message}', flush=True)
        elif isinstance(error, (RuntimeError, MemoryError)) and is_out_of_memory(error):
            message = OUT_OF_MEMORY_HINT.format(**{**vars(config), 'device': device, 'class_name': class_name})
            print(f'error: {message}', flush=True)
            out_of_memory = True
        elif catch_all:
            traceback.print_exc()
            message = f'{type(error).__name__}: {error}'
            print(f'error: class {class_name} (seed {seed}) failed: {message}', flush=True)
        else:
            raise
    if out_of_memory and str(device).startswith('cuda'):
        import torch
        # the failed job's tensors are freed once the exception is gone; hand their cached blocks back so
        # the next job of a sweep (or another process on this GPU) can have them
        torch.cuda.empty_cache()
    record(entry, message and {'class_name': class_name, 'seed': seed, 'error': message})
    if state_path:
        if os.path.isfile(state_path):
            os.remove(state_path)
        remove_stale_temporaries(state_path)  # a writer killed while saving it leaves its temporary file


def checked_class_names(config):
    """(class names, {class: why it cannot run}); raises UserError when no class can run."""
    from utils import UserError, find_class_samples
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
    return names, problems


POOL_WARNING = ('warning: train_feature_pool {pool} draws training views from a fixed pool; on MVTec screw (not '
                'rotation-symmetric) the flow memorizes it: AUROC peaked near 0.85 and fell to 0.75 within 8 x 8 '
                'epochs, in fp32 and bf16 alike, where the official on-line views reached 0.92 (docs/performance.md); '
                '0, the on-line views, is the safe choice')


def with_precision(config, device):
    """(config with bf16_autocast decided for `device`, the line saying what was chosen and why): runs,
    results.json and checkpoints hold the choice, not 'auto'."""
    from utils import bf16_pays_off, choose_precision
    use_bf16, line = choose_precision(config.bf16_autocast, *bf16_pays_off(device))
    return build_config(**{**vars(config), 'bf16_autocast': use_bf16}), line


def run(config, resume=None):
    """Runs every requested (class, seed); returns (results folder, failed runs, runs done).

    `resume` = (results_dir, results) of an interrupted run: finished runs are kept, the run in progress
    continues from its last finished meta epoch, the rest run as planned.
    """
    from sweep import disk_text, finished_job_entries
    from utils import DEMO_CLASS, DEMO_DATASET_PATH, ensure_demo_dataset, resolve_device
    from report import results_markdown, write_results_files

    validate_config(config)
    device = resolve_device(config.device)
    config, precision = with_precision(config, device)
    print(precision)
    if config.train_feature_pool:
        print(POOL_WARNING.format(pool=config.train_feature_pool))
    if os.path.normpath(config.dataset_path) == DEMO_DATASET_PATH and ensure_demo_dataset(DEMO_DATASET_PATH):
        print(f'Generated the demo dataset in {DEMO_DATASET_PATH}/{DEMO_CLASS}')
    names, problems = checked_class_names(config)
    deviations = deviations_from_paper(config)
    if resume:
        results_dir, results = resume
        results['classes'] = [entry for entry in results['classes'] if entry.get('status') == 'done']  # retry others
        done = {(entry['class_name'], entry['seed']) for entry in results['classes']}
        for entry in finished_job_entries(results_dir):  # jobs a sweep (torchrun) finished
            if (entry['class_name'], entry['seed']) not in done:
                results['classes'].append(entry)
                done.add((entry['class_name'], entry['seed']))
        results['failed'], results['in_progress'] = [], None
    else:
        results_dir = fresh_results_dir(config)
        results, done = {'config': vars(config), 'seeds': run_seeds(config), 'classes': [], 'failed': [],
                         'in_progress': None}, set()
    n_jobs = sum((name, seed) not in done for name in names if name not in problems for seed in run_seeds(config))
    print(disk_text(config, n_jobs), flush=True)
    state_dir = os.path.join(results_dir, 'resume')

    def save_progress(entry):
        results['in_progress'] = entry
        write_results_files(results_dir, results, deviations)

    def record(entry, failure):
        if entry is not None:
            results['classes'].append(entry)
        if failure is not None:
            results['failed'].append(failure)
        results['in_progress'] = None
        write_results_files(results_dir, results, deviations)

    try:
        for class_name in names:
            if class_name in problems:
                print(f'error: class {class_name} skipped: {problems[class_name]}', flush=True)
                results['failed'].append({'class_name': class_name, 'seed': None, 'error': problems[class_name]})
                write_results_files(results_dir, results, deviations)
                continue
            for seed in run_seeds(config):
                if (class_name, seed) not in done:
                    run_job(config, class_name, seed, device, results_dir, record, save_progress)
    except KeyboardInterrupt:
        write_results_files(results_dir, results, deviations)
        print(f'\nInterrupted. Results of the finished classes and meta epochs are in {results_dir}/.\n'
              f'Continue exactly where it stopped with:  python main.py --resume {results_dir}', flush=True)
        raise
    if os.path.isdir(state_dir) and not os.listdir(state_dir):
        os.rmdir(state_dir)
    print('\n' + results_markdown(results, deviations))
    print(f'Results: {results_dir}/ (results.json, results.md, results.csv, auroc.png, per-class scores and plots)')
    print(f"Report: {os.path.join(results_dir, 'report.html')} (one page with every table and plot; open it in a browser)")
    return results_dir, len(results['failed']), len(results['classes'])


def score(config, args):
    """The --score command, after checking its options go together."""
    from utils import UserError
    if not args.score or not args.checkpoint:
        raise UserError('--score PATH... and --checkpoint FILE go together, e.g. '
                        '--score data/new_parts --checkpoint results/RUN/bottle_checkpoint.pt')
    validate_threshold_fpr(config)
    score_images(config, args.score, args.checkpoint, threshold=args.threshold, score_out=args.score_out,
                 maps_dir=args.maps, log=lambda line: print(line, flush=True))


def scoring_settings(checkpoint_settings, config):
    """What scoring runs with: `config` (device, workers, threshold_fpr, ...) with every value the
    checkpoint fixes on top, and no disk feature cache (scored images are one-offs)."""
    values = dict(vars(config))
    values.update(checkpoint_settings)
    values['feature_cache'] = False
    return types.SimpleNamespace(**values)


def score_images(config, paths, checkpoint_path, threshold=None, score_out='scores.csv', maps_dir='',
                 log=print):
    """The `--score` command: scores the images of `paths` with the checkpoint, decides with the
    threshold, prints a table, writes the CSV (and a gradient-map PNG per image into `maps_dir`).
    Returns the rows (file, score, decision)."""
    from localization import export_map, map_file_name
    from model import load_checkpoint
    from train import prepare_model, reference_view_features, scores_of_features
    from utils import (Sample, UserError, collect_images, decision_threshold, image_problems, resolve_device,
                       write_scores_csv)

    image_paths = collect_images(paths)
    problems = image_problems(image_paths)
    if problems:
        raise UserError('; '.join(f'cannot read image {path} ({reason})' for path, reason in problems)
                        + '; replace or remove it')
    model, checkpoint = load_checkpoint(checkpoint_path, config)
    settings = scoring_settings(checkpoint['settings'], config)
    threshold, origin = decision_threshold(checkpoint['reference_scores'], config.threshold_fpr, threshold,
                                           checkpoint_path)
    device = resolve_device(config.device)
    prepare_model(model, settings, device)
    log(f"Checkpoint {checkpoint_path} ({checkpoint['class_name'] or 'official'}; "
        f"{checkpoint['extractor']['source']}; {settings.n_transforms_test} views at fixed rotations)")
    log(f'Threshold {threshold:.6g}: {origin}')
    samples = [Sample(path, -1, '') for path in image_paths]
    features = reference_view_features(model, samples, settings, device, 'scored images', log)
    scores = scores_of_features(model, features, settings)
    rows = [(path, float(score), 'anomalous' if score > threshold else 'good')
            for path, score in zip(image_paths, scores)]
    width = max(len(path) for path in image_paths)
    log(f"{'file':<{width}}  {'score':>12}  decision")
    for path, score, decision in rows:
        log(f'{path:<{width}}  {score:>12.6g}  {decision}')
    write_scores_csv(score_out, rows)
    n_anomalous = sum(decision == 'anomalous' for _, _, decision in rows)
    log(f'{len(rows)} images, {n_anomalous} anomalous; wrote {score_out}')
    if maps_dir:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in image_paths])
        for path, score, _ in rows:
            export_map(model, path, os.path.basename(os.path.dirname(os.path.abspath(path))), settings, device,
                       os.path.join(maps_dir, map_file_name(path, root)), score=score)
        log(f'gradient maps: {len(rows)} PNGs in {maps_dir}')
    return rows


def raise_keyboard_interrupt(signal_number, frame):
    raise KeyboardInterrupt


def main(argv=None):
    """Exit status: 0 all runs done, 1 some failed, 2 nothing could run (user error), 130 interrupted.

    Under torchrun with two or more processes the runs are a sweep (sweep.py): every process takes jobs;
    rank 0 merges and exits with the status of the whole sweep, the others with 0 (2 or 130 as above).
    """
    argv = sys.argv[1:] if argv is None else argv
    if '-h' in argv or '--help' in argv:
        parse_command_line(argv)  # prints the help and exits before torch is imported: about a second
    from sweep import RankZeroError, prefix_output, run_sweep, torchrun_launch
    from utils import UserError
    launch = torchrun_launch()
    restore_output = prefix_output(launch) if launch else None
    previous_handler = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # SIGTERM stops like Ctrl-C
    try:
        config, args = parse_command_line(argv)
        if args.score or args.checkpoint:
            if launch:
                raise UserError('--score runs in one process: python main.py --score ..., not under torchrun')
            score(config, args)
            return 0
        resume = None
        if args.resume:
            config, previous = load_run_to_resume(args.resume)
            resume = (args.resume, previous)
            print(f'Resuming {args.resume} with its own configuration (other options are ignored)')
        if launch:
            _, n_failed, n_done = run_sweep(config, launch, resume)
            if launch.rank != 0:
                return 0
        else:
            _, n_failed, n_done = run(config, resume)
    except UserError as error:
        if not isinstance(error, RankZeroError):
            print(f'error: {error}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if restore_output:
            restore_output()
    if n_failed:
        print(f'error: {n_failed} run(s) failed; see above and results.md', file=sys.stderr)
        return 1 if n_done else 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
