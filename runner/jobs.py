"""The job runner: one (class, seed) job, and the jobs of a run one after another, with what every run
shares: the checks and lines it starts with, its results folder, --resume, the finished jobs, the summary it
ends with. main.py runs it in one process; sweep.py hands its jobs to the processes of a torchrun.
"""
import logging
import os

import torch

from base.atomic_files import WriteFailed, remove_stale_temporaries
from base.errors import UserError
from base.file_names import file_stem
from base.hardware import bf16_pays_off, choose_flow_kernel, choose_precision, resolve_device
from base.job_memory import JobMemory
from base.metrics import defect_type_aurocs, f1_at_threshold, f1_max
from base.settings import (deviations_from_paper, requested_class_names, run_seeds, settings_group, stored_config,
                           validate_config, with_values)
from base.thresholds import decision_threshold, score_statistics
from image_data.demo_data import DEMO_CLASS, DEMO_DATASET_PATH, ensure_demo_dataset
from image_data.layouts import (class_folder_of, class_folders, detect_layout, find_class_samples, n_validation_images,
                                scan_class, split_validation, training_subset)
from localization import localize_class
from model import build_model, fixed_rotation_features, save_checkpoint, score_view_features
from reporting.results_files import results_markdown, write_results_files
from runner.disk import check_free_space, disk_text, space_needs
from runner.failures import (continue_command, failed_jobs_text, failure_line, failure_message, finished_whole,
                             is_out_of_memory, remove_finished_states, remove_resume_state, resume_state_path,
                             stopped_by_bug)
from runner.run_folder import finished_entries, fresh_results_dir
from train import TrainingDiverged, seed_everything, train_class

logger = logging.getLogger(__name__)

POOL_WARNING = ('warning: train_feature_pool {pool} draws training views from a fixed pool; on MVTec screw (not '
                'rotation-symmetric) the flow memorizes it: AUROC peaked near 0.85 and fell to 0.75 within 8 x 8 '
                'epochs, in fp32 and bf16 alike, where the official on-line views reached 0.92 (docs/performance.md); '
                '0, the on-line views, is the safe choice')


def class_names(config):
    """The requested classes: one name, a comma-separated list (or a list in config.py), or 'all' (every
    class folder of dataset_path)."""
    names = requested_class_names(config)
    if names == ['all']:
        if not os.path.isdir(config.dataset_path):
            raise UserError(f'dataset path {config.dataset_path} does not exist')
        names = class_folders(config.dataset_path)
        if not names:
            raise UserError(f'no class folders in {config.dataset_path}')
    return names


def checked_class_names(config):
    """(class names, {class: why it cannot run}); raises UserError when no class can run."""
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


def with_machine_choices(config, device):
    """(config with bf16_autocast and cpu_flow_kernel decided for `device`, the lines saying what was chosen
    and why): runs, results.json and checkpoints hold the choices, not 'auto'."""
    measure = config.bf16_autocast == 'auto'
    use_bf16, precision = choose_precision(config.bf16_autocast, *bf16_pays_off(device, measure))
    kernel, kernels = choose_flow_kernel(config.cpu_flow_kernel, device, use_bf16, config.batch_size *
                                         config.n_transforms, config.fc_internal)
    return with_values(config, bf16_autocast=use_bf16, cpu_flow_kernel=kernel), [precision, kernels]


def class_sizes(config, names):
    """{class: (training images it trains on, test images)} of `names`, for what a run will write."""
    sizes = {}
    for name in names:
        train, test = find_class_samples(config.dataset_path, name)
        n_train = len(train) - n_validation_images(config.val_fraction, len(train))
        sizes[name] = (min(n_train, config.n_train_images) if config.n_train_images else n_train, len(test))
    return sizes


def check_disk(config, results_dir, jobs, running_at_once=1):
    """Prints the disk line and refuses (UserError) a run whose files do not fit where they go; `jobs` are
    the (class, seed) pairs still to run."""
    logger.info(disk_text(config, len(jobs), running_at_once))
    sizes = class_sizes(config, sorted({name for name, _ in jobs}))
    check_free_space(space_needs(config, results_dir, [sizes[name] for name, _ in jobs], running_at_once))


def start_run(config, device):
    """What every run starts with (one process, or rank 0 of a sweep): the checks of the configuration, the
    precision line, the demo set where it is asked for, the classes that can run. Returns (config with the
    precision decided, class names, {class: why it cannot run})."""
    validate_config(config)
    config, lines = with_machine_choices(config, device)
    logger.info('\n'.join(lines))
    if config.train_feature_pool:
        logger.warning(POOL_WARNING.format(pool=config.train_feature_pool))
    if os.path.normpath(config.dataset_path) == DEMO_DATASET_PATH and ensure_demo_dataset(DEMO_DATASET_PATH):
        logger.info(f'Generated the demo dataset in {DEMO_DATASET_PATH}/{DEMO_CLASS}')
    names, problems = checked_class_names(config)
    return config, names, problems


def end_run(results_dir, results, deviations, where_else='', on_disk=True):
    """What every run ends with: the resume states of its finished jobs gone (when `results` are on disk), the
    summary printed with the command that continues its failed jobs, and where its files are."""
    if on_disk:
        remove_finished_states(results_dir, [(entry['class_name'], entry['seed'])
                                             for entry in results['classes'] if finished_whole(entry)])
    logger.info('\n' + results_markdown(results, deviations))
    if results['failed']:
        logger.info(failed_jobs_text(results_dir, results['failed']))
    logger.info(f'Results: {results_dir}/ (results.json, results.md, results.csv, auroc.png, per-class scores and '
                f'plots{where_else})')
    logger.info(f"Report: {os.path.join(results_dir, 'report.html')} (one page with every table and plot; open it "
                f'in a browser)')


def class_samples(config, class_name, device):
    """(layout, training, validation and test samples) of a class, checked and announced."""
    train_samples, test_samples = find_class_samples(config.dataset_path, class_name)
    for warning in scan_class(config.dataset_path, class_name, train_samples, test_samples):
        logger.warning(f'warning: {warning}')
    train_samples, val_samples = split_validation(train_samples, config.val_fraction, config.seed)
    available = len(train_samples)
    train_samples = training_subset(train_samples, config.n_train_images, config.seed)
    layout = detect_layout(class_folder_of(config.dataset_path, class_name))
    held_out = f' ({len(val_samples)} more held out for the --score threshold)' if val_samples else ''
    subset = f' (a seeded {len(train_samples)} of {available}: n_train_images)' if config.n_train_images else ''
    logger.info(f'\n=== {class_name} (seed {config.seed}, {layout} layout): ' + workload_text(config, train_samples, test_samples)
          + f'{subset}{held_out}, device {device}')
    return layout, train_samples, val_samples, test_samples, available


def run_class(config, class_name, device, results_dir, on_meta_epoch=None, resume_path=None):
    """Trains and evaluates one class with `config.seed`, saves its checkpoint (with save_checkpoint) and
    with grad_map_viz its gradient maps and pixel metrics; returns its results entry.

    A NaN/inf loss returns the entry of the meta epochs finished before, with `status` 'diverged'.
    """
    layout, train_samples, val_samples, test_samples, available = class_samples(config, class_name, device)
    seed_everything(config.seed)
    model, weights_source = build_model(settings_group(config, 'model'))
    logger.info(f'AlexNet weights: {weights_source}')
    stem = file_stem(class_name, config.seed, run_seeds(config))
    save = checkpoint_saver(model, config, weights_source, class_name, train_samples, val_samples, device)
    best_path = os.path.join(results_dir, f'{stem}_best.pt')

    def entry_of(history, status):
        return class_entry(config, class_name, layout, weights_source, train_samples, test_samples, history, status)

    def after_meta_epoch(meta_epoch, history, scores, is_new_max):
        if config.save_best and is_new_max:
            try:
                save(best_path, dict(history, meta_epoch=meta_epoch))
                logger.info(f'Best checkpoint (meta epoch {meta_epoch}): {best_path}')
            except WriteFailed as error:
                logger.warning(f'warning: {error}; training goes on without this best checkpoint')
        if on_meta_epoch is not None:
            on_meta_epoch(entry_of(history, 'in progress'))

    status, error = 'done', None
    try:
        history = train_class(model, train_samples, test_samples, config, device, resume_path=resume_path,
                              on_meta_epoch=after_meta_epoch)
    except TrainingDiverged as diverged:  # run_job says it, with the command that continues
        history, status, error = diverged.history, 'diverged', str(diverged)
    entry = entry_of(history, status)
    entry['n_validation_images'] = len(val_samples)
    if config.n_train_images:  # the few-shot subset: which images, out of how many
        entry['train_subset_of'] = available
        entry['train_files'] = [os.path.relpath(sample.path, config.dataset_path) for sample in train_samples]
    if status == 'done':
        entry.update(finish_class(model, config, save, test_samples, device, results_dir, stem, history))
    if error:
        entry['error'] = error
    return entry


def finish_class(model, config, save, test_samples, device, results_dir, stem, history):
    """What a finished class adds to its entry: its checkpoint (with save_checkpoint) and, with grad_map_viz,
    its gradient maps and pixel metrics."""
    added = {}
    if config.save_checkpoint:  # off, the reference views are never extracted either
        checkpoint_path = os.path.join(results_dir, f'{stem}_checkpoint.pt')
        try:
            statistics = save(checkpoint_path, history)
        except WriteFailed as error:  # the numbers are finished: they are recorded, and --resume writes it
            return {**added, 'checkpoint_error': str(error)}
        logger.info(f'Checkpoint: {checkpoint_path}')
        added['checkpoint'] = os.path.basename(checkpoint_path)
        threshold, _ = decision_threshold(statistics, config.threshold_fpr)
        added['checkpoint_threshold'] = threshold  # what --score decides with, at threshold_fpr
        added['f1_at_checkpoint_threshold'] = f1_at_threshold(history['test_labels'], history['test_scores'],
                                                              threshold)
    if config.grad_map_viz:
        added.update(localize_class(model, test_samples, config, device, os.path.join(results_dir, 'maps', stem)))
    return added


def checkpoint_saver(model, config, weights_source, class_name, train_samples, val_samples, device):
    """save(path, history) -> the score statistics: writes the checkpoint of `model` as it is now, with the score statistics of
    defect-free images at the fixed rotations: the validation images, and `max_reference_images` of the
    training images (evenly spaced in sorted order; 0 = all). Their features are extracted at the first
    save only; later saves rerun just the flow."""

    if config.max_reference_images and len(train_samples) > config.max_reference_images:
        step = len(train_samples) / config.max_reference_images
        train_samples = [train_samples[int(i * step)] for i in range(config.max_reference_images)]
    references = {'training': train_samples, 'validation': val_samples}
    features = {}

    def save(path, history):
        if not features:
            # model.seeded_view_features leaves torch's random stream as it was, so training runs the same
            # whether or not (and whenever) a checkpoint is saved
            for name, samples in references.items():
                if samples:
                    features[name] = fixed_rotation_features(model, samples, config, device, f'{name} reference views')
        statistics = {name: None for name in references}
        for name, samples in references.items():
            if samples:
                files = [os.path.relpath(sample.path, config.dataset_path) for sample in samples]
                scores, _ = score_view_features(model, features[name], config.batch_size_test)
                statistics[name] = score_statistics(scores, files)
        save_checkpoint(path, model, config, weights_source, history, statistics, class_name)
        return statistics

    return save


def class_entry(config, class_name, layout, weights_source, train_samples, test_samples, history, status):
    """The results.json entry of one (class, seed) run, from its training history."""
    defect_types = [sample.defect_type for sample in test_samples]
    entry = dict(class_name=class_name, seed=config.seed, status=status, layout=layout,
                 weights_source=weights_source, n_train_images=len(train_samples),
                 n_test_images=len(test_samples), **history,
                 test_files=[os.path.relpath(sample.path, config.dataset_path) for sample in test_samples],
                 test_defect_types=defect_types,
                 test_mask_files=[sample.mask_path and os.path.relpath(sample.mask_path, config.dataset_path)
                                  for sample in test_samples])
    if history.get('test_scores'):
        entry['f1_max_last'], entry['f1_max_threshold_last'] = f1_max(history['test_labels'], history['test_scores'])
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


def run_job(config, class_name, seed, device, results_dir, record, on_progress=None, catch_all=False):
    """Runs one (class, seed) job; calls record(entry or None, failure or None) when it ends, which returns
    whether the job is recorded on disk. A failure is {class_name, seed, error}; a diverged run has both.

    The job's resume state is removed only once the job finished whole (runner/failures.finished_whole) and
    is recorded: every failure keeps it, and --resume continues from it. User errors, a full disk and
    out-of-memory fail the job; other exceptions do too with `catch_all` (a sweep goes on with the other
    jobs), else they propagate, as KeyboardInterrupt always does.
    """
    state_path = None
    if config.resume_state:
        state_path = resume_state_path(results_dir, class_name, seed)
        os.makedirs(os.path.dirname(state_path), exist_ok=True)
        remove_stale_temporaries(state_path)  # a writer killed while saving it left its temporary file
    entry = message = None
    out_of_memory = False
    memory = JobMemory(device)
    try:
        with memory:
            entry = run_class(with_values(config, seed=seed), class_name, device, results_dir, on_progress,
                              state_path)
        entry.update(memory.figures())
        if entry['status'] != 'done':
            message = entry['error']
        elif entry.get('checkpoint_error'):
            message = f"finished, but its checkpoint was not written: {entry['checkpoint_error']}"
    except Exception as error:  # MemoryError included
        message = failure_message(error, config, device, class_name, seed, catch_all)
        if message is None:
            raise
        out_of_memory = is_out_of_memory(error) and not isinstance(error, (UserError, WriteFailed))
    if out_of_memory and str(device).startswith('cuda'):
        # the failed job's tensors are freed once the exception is gone; hand their cached blocks back so
        # the next job of a sweep (or another process on this GPU) can have them
        torch.cuda.empty_cache()
    if message:
        logger.error(failure_line(class_name, seed, message, results_dir, state_path))
    recorded = record(entry, message and {'class_name': class_name, 'seed': seed, 'error': message})
    if state_path and recorded and finished_whole(entry):
        remove_resume_state(state_path)


def run(config, resume=None):
    """Runs every requested (class, seed) in this process; returns (results folder, failed runs, runs done).

    `resume` = (results_dir, results) of an interrupted run: finished runs are kept, the run in progress
    continues from its last finished meta epoch, the rest run as planned.
    """
    device = resolve_device(config.device)
    config, names, problems = start_run(config, device)
    deviations = deviations_from_paper(config)
    if resume:
        results_dir, results = resume
        finished = finished_entries(results_dir, results)  # failed jobs run again
        results.update(config=stored_config(config), classes=list(finished.values()), failed=[], in_progress=None)
    else:
        results_dir, finished = fresh_results_dir(config, names), {}
        results = {'config': stored_config(config), 'seeds': run_seeds(config), 'classes': [], 'failed': [],
                   'in_progress': None}
    pending = [(name, seed) for name in names if name not in problems for seed in run_seeds(config)
               if (name, seed) not in finished]
    check_disk(config, results_dir, pending)
    try:
        written = run_jobs(config, names, problems, finished, device, results_dir, results, deviations)
    except KeyboardInterrupt:
        write_results_or_warn(results_dir, results, deviations)
        logger.info(f'\nInterrupted. Results of the finished classes and meta epochs are in {results_dir}/.\n'
                    f'Continue exactly where it stopped with:  {continue_command(results_dir)}')
        raise
    except Exception as error:
        try:
            write_results_or_warn(results_dir, results, deviations)
        except Exception:  # the bug may be in writing them; the one to report is the first
            pass
        raise stopped_by_bug(error, results_dir) from error
    written = written or write_results_or_warn(results_dir, results, deviations)  # the last chance to record them
    if not written:
        results['failed'].append({'class_name': '(results files)', 'seed': None,
                                  'error': f'the results files in {results_dir} could not be written'})
    end_run(results_dir, results, deviations, on_disk=written)
    return results_dir, len(results['failed']), len(results['classes'])


def write_results_or_warn(results_dir, results, deviations, figures=True):
    """write_results_files; a file that cannot be written (a full disk) is a warning: training goes on and
    the files are written again after the next meta epoch. Returns whether every file was written."""
    try:
        write_results_files(results_dir, results, deviations, figures)
        return True
    except WriteFailed as error:
        logger.warning(f'warning: {error}; training goes on, the results files are written again at the next meta '
                       'epoch')
        return False


def run_jobs(config, names, problems, finished, device, results_dir, results, deviations):
    """The jobs not in `finished`, one after another, `results` and its files following each meta epoch (the
    tables) and each job (everything). Returns whether the files on disk hold `results` as they are now."""
    written = [False]

    def save_progress(entry):
        results['in_progress'] = entry
        write_results_or_warn(results_dir, results, deviations, figures=False)
        written[0] = False

    def record(entry, failure):
        if entry is not None:
            results['classes'].append(entry)
        if failure is not None:
            results['failed'].append(failure)
        results['in_progress'] = None
        written[0] = write_results_or_warn(results_dir, results, deviations)
        return written[0]

    for class_name in names:
        if class_name in problems:
            logger.error(f'error: class {class_name} skipped: {problems[class_name]}')
            record(None, {'class_name': class_name, 'seed': None, 'error': problems[class_name]})
            continue
        for seed in run_seeds(config):
            if (class_name, seed) not in finished:
                run_job(config, class_name, seed, device, results_dir, record, save_progress)
    return written[0]
