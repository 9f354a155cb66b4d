"""What a run writes to disk: the size of its checkpoints, resume states, results and feature-cache files, said
before it starts, and checked against the free space where each goes."""
import os

import torch
import torchvision

from base.atomic_files import free_bytes, size_text
from base.errors import UserError
from model import N_FEATURES_PER_SCALE, build_flow

BYTES_PER_VALUE = 4  # float32 parameters and Adam moments
# a job's results beside its checkpoint, about twice what MVTec bottle wrote (0.7 MB, gradient maps of 220 to
# 240 kB): its entry in results.json/md/csv, its score list, two plots and its section of report.html (up to 12
# gradient maps), each file written beside the old one before it goes; with grad_map_viz a PNG per anomalous
# test image (960 x 360 pixels whatever the image size)
RESULTS_BYTES_PER_JOB = 2_000_000
MAP_PNG_BYTES = 500_000


def flow_parameter_count(config):
    """Parameters of the flow that `config` builds, counted on the meta device (nothing is allocated)."""
    with torch.device('meta'):
        flow = build_flow(config)
    return sum(parameter.numel() for parameter in flow.parameters())


def alexnet_parameter_count():
    with torch.device('meta'):
        features = torchvision.models.alexnet(weights=None).features
    return sum(parameter.numel() for parameter in features.parameters())


def checkpoint_bytes(config):
    """Size of one <class>_checkpoint.pt: the flow, plus the AlexNet weights when they cannot be reloaded
    from the ImageNet source (random or a weights_path file; model.save_checkpoint). The history and
    reference scores add kilobytes."""
    values = flow_parameter_count(config)
    if not config.pretrained or config.weights_path:
        values += alexnet_parameter_count()
    return values * BYTES_PER_VALUE


def resume_state_bytes(config):
    """Size of one resume state: the flow and Adam's two moments per parameter (base/resume_state.save_resume_state)."""
    return 3 * flow_parameter_count(config) * BYTES_PER_VALUE


def disk_text(config, n_jobs, running_at_once=1):
    """The line a run starts with: what its checkpoints and resume states will take on disk."""
    if config.save_checkpoint or config.save_best:
        files = ' + '.join(name for name, on in (('<class>_checkpoint.pt', config.save_checkpoint),
                                                 ('<class>_best.pt', config.save_best)) if on)
        per_job = checkpoint_bytes(config) * (int(config.save_checkpoint) + int(config.save_best))
        checkpoints = f'{size_text(per_job)} per job for {files} ({n_jobs} job{"s" if n_jobs != 1 else ""}: {size_text(n_jobs * per_job)})'
    else:
        checkpoints = 'no checkpoints (save_checkpoint = False)'
    if config.resume_state:
        per_running_job = resume_state_bytes(config)
        at_once = f', {running_at_once} at once: {size_text(running_at_once * per_running_job)}' \
            if running_at_once > 1 else ''
        states = (f'{size_text(per_running_job)} per running job for its resume state (removed when the job has '
                  f'finished, kept for --resume when it fails{at_once})')
    else:
        states = 'no resume states (resume_state = False)'
    return f'disk: {checkpoints}; {states}'


def feature_cache_bytes(config, n_train, n_test):
    """What one job adds to the feature cache: its test views (cache_test_features), its training pool
    (train_feature_pool) and its checkpoint's reference views (save_checkpoint), float32 features."""
    per_view = N_FEATURES_PER_SCALE * config.n_scales * BYTES_PER_VALUE
    views = n_test * config.n_transforms_test if config.cache_test_features else 0
    views += n_train * config.train_feature_pool
    if config.save_checkpoint or config.save_best:
        references = min(n_train, config.max_reference_images) if config.max_reference_images else n_train
        views += (references + round(config.val_fraction * n_train)) * config.n_transforms_test
    return views * per_view


def results_bytes(config, n_test):
    """What one job's results take (RESULTS_BYTES_PER_JOB; with grad_map_viz at most a map per test image)."""
    return RESULTS_BYTES_PER_JOB + (n_test * MAP_PNG_BYTES if config.grad_map_viz else 0)


def space_needs(config, results_dir, job_sizes, running_at_once=1):
    """{folder: [(what, bytes)]} that the run will write, counted as it is written: each job's checkpoint
    once (a file replaced, by --resume or a best checkpoint at a new maximum, is written beside the old one,
    which is on disk already: the replacement needs free space for the new one only, once more per running
    job for best checkpoints), the resume states of the jobs running at once (a state, and the next one
    written beside it), each job's results, the feature-cache files. `job_sizes` is [(training images, test
    images)] per job still to run."""
    needs = {results_dir: [], config.feature_cache_dir: []}
    n_jobs, at_once = len(job_sizes), min(running_at_once, len(job_sizes))
    if config.save_checkpoint and n_jobs:
        needs[results_dir].append((f'{n_jobs} checkpoint file(s)', n_jobs * checkpoint_bytes(config)))
    if config.save_best and n_jobs:
        needs[results_dir].append((f'{n_jobs} best checkpoint file(s), each replaced at a new maximum',
                                   (n_jobs + at_once) * checkpoint_bytes(config)))
    if config.resume_state and n_jobs:
        needs[results_dir].append((f'the resume states of {at_once} running job(s), each with the next beside it',
                                   2 * at_once * resume_state_bytes(config)))
    if n_jobs:
        needs[results_dir].append(('results', sum(results_bytes(config, n_test) for _, n_test in job_sizes)))
    if config.feature_cache:
        cache = sum(feature_cache_bytes(config, n_train, n_test) for n_train, n_test in job_sizes)
        if cache:
            needs[config.feature_cache_dir].append(('feature-cache files', cache))
    return {folder: items for folder, items in needs.items() if items}


def check_free_space(needs):
    """Raises UserError naming the folder, what goes there, its size and the free space, and the settings
    that shrink it, when what the run will write does not fit; folders on one file system add up."""
    by_device = {}
    for folder, items in needs.items():
        existing = os.path.abspath(folder)
        while not os.path.exists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        by_device.setdefault(os.stat(existing).st_dev, []).append((folder, items))
    for folders in by_device.values():
        need = sum(size for _, items in folders for _, size in items)
        free = free_bytes(folders[0][0])
        if need > free:
            what = '; '.join(f"{folder}: {', '.join(f'{name} {size_text(size)}' for name, size in items)}"
                             for folder, items in folders)
            raise UserError(f'not enough disk space: the run writes {size_text(need)} ({what}) where '
                            f'{size_text(free)} is free; shrink it with --save_checkpoint false, --resume_state '
                            f'false or --feature_cache false, or give another --results_dir')
