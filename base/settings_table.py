"""Every setting of config.py once: its group, its paper/official value, whether and how it changes the numbers
a run computes, and where the code must keep it (checkpoints, feature-cache keys, --resume, the machine).

config.py holds the values a user edits; this table holds what the code needs to know about each, and every
list of setting names elsewhere is derived from it (tests/test_settings_table.py keeps the two in step).
"""
from typing import NamedTuple


class NoPaperValue:
    """The paper and the official code give no value for the setting (it is ours, or the data's)."""

    def __repr__(self):
        return 'no paper value'


NO_PAPER_VALUE = NoPaperValue()

# the places a setting can be kept in, besides the run's own results.json
FLAGS = {
    'checkpoint': 'stored in every checkpoint: scoring needs it without the config of the run',
    'cache_key': "part of the feature-cache key: extracted features depend on it",
    'resume': 'may be changed when a run is continued with --resume (it changes no number the run computes)',
    'machine': "'auto' is decided for the machine at the start of a run (rank 0 of a sweep for every rank)",
    'positive': 'an integer of at least 1',
    'path': 'a path: results.json stores it absolute, so a run resumes from any working directory',
    'auto': "a true/false setting that also takes 'auto'",
    'jobs': 'says which jobs a run has (classes, seeds), not the numbers of one job',
}


class Setting(NamedTuple):
    groups: tuple  # the typed groups that hold it: data, views, model, training, numerics, outputs, run
    paper: object  # the paper's or the official code's value, or NO_PAPER_VALUE
    changes_numbers: bool  # whether it can change a loss, score, AUROC or checkpoint
    effect: str  # how it changes the numbers, or why it changes none
    flags: frozenset  # names of FLAGS


def setting(groups, paper=NO_PAPER_VALUE, *, numbers, effect='', flags=''):
    return Setting(tuple(groups.split()), paper, numbers, effect, frozenset(flags.split()))


ROUNDING = 'float rounding only'
SETTINGS = {
    # --- data ---
    'dataset_path': setting('data', numbers=True, effect='which data is measured', flags='path'),
    'class_name': setting('data', numbers=True, effect='which classes are measured', flags='jobs'),
    'results_dir': setting('outputs', numbers=False, effect='where results are written (with --resume: the '
                                                            'folder it names)', flags='path'),
    'img_size': setting('model views', 448, numbers=True, effect='the network input',
                        flags='checkpoint cache_key positive'),
    # --- augmentation ---
    'transf_rotations': setting('views', True, numbers=True, effect='the views', flags='checkpoint cache_key'),
    'transf_brightness': setting('views', 0.0, numbers=True, effect='the views', flags='checkpoint cache_key'),
    'transf_contrast': setting('views', 0.0, numbers=True, effect='the views', flags='checkpoint cache_key'),
    'transf_saturation': setting('views', 0.0, numbers=True, effect='the views', flags='checkpoint cache_key'),
    'norm_mean': setting('views', (0.485, 0.456, 0.406), numbers=True, effect='the views',
                         flags='checkpoint cache_key'),
    'norm_std': setting('views', (0.229, 0.224, 0.225), numbers=True, effect='the views',
                        flags='checkpoint cache_key'),
    'fixed_test_rotations': setting('views', False, numbers=True, effect='the test views'),
    # --- network ---
    'n_scales': setting('model', 3, numbers=True, effect='the network', flags='checkpoint cache_key positive'),
    'n_coupling_blocks': setting('model', 8, numbers=True, effect='the flow', flags='checkpoint positive'),
    'clamp_alpha': setting('model', 3.0, numbers=True, effect='the flow', flags='checkpoint'),
    'fc_internal': setting('model', 2048, numbers=True, effect='the flow', flags='checkpoint positive'),
    'dropout': setting('model', 0.0, numbers=True, effect='the flow', flags='checkpoint'),
    'pretrained': setting('model', True, numbers=True, effect='the AlexNet weights'),
    'weights_path': setting('model', '', numbers=True, effect='the AlexNet weights', flags='path'),
    # --- optimisation ---
    'lr_init': setting('training', 2e-4, numbers=True, effect='the training'),
    'adam_betas': setting('training', (0.8, 0.8), numbers=True, effect='the training'),
    'adam_eps': setting('training', 1e-4, numbers=True, effect='the training'),
    'weight_decay': setting('training', 1e-5, numbers=True, effect='the training'),
    'max_grad_norm': setting('training', 0.0, numbers=True, effect='the training'),
    'adam_fused': setting('training', False, numbers=True, effect=f'the Adam update, {ROUNDING}'),
    'meta_epochs': setting('training', 24, numbers=True, effect='the training', flags='positive'),
    'sub_epochs': setting('training', 8, numbers=True, effect='the training', flags='positive'),
    'n_transforms': setting('views', 4, numbers=True, effect='the training views', flags='positive'),
    'n_transforms_test': setting('views', 64, numbers=True, effect='the score of an image',
                                 flags='checkpoint positive'),
    'batch_size': setting('training', 24, numbers=True, effect='the training', flags='positive'),
    'batch_size_test': setting('numerics', 1, numbers=True,
                               effect='the test loss (a mean over batches); the scores up to float rounding',
                               flags='checkpoint positive'),
    'extract_batch_size': setting('numerics', numbers=True, flags='checkpoint cache_key positive',
                                  effect=f"views per AlexNet pass: {ROUNDING} (docs/faithfulness.md); the official "
                                         "code passes a batch's 96 training views or an image's 64 test views at once"),
    'extract_batch_size_cuda': setting('numerics', numbers=True, effect='the same on a CUDA device',
                                       flags='cache_key positive'),
    # --- speed ---
    'train_feature_pool': setting('training', 0, numbers=True, effect='the training views (a fixed pool)'),
    'cache_test_features': setting('training', False, numbers=True,
                                   effect='the test views (drawn once from the seed, not anew each meta epoch)'),
    'feature_cache': setting('outputs', numbers=False, flags='resume',
                             effect='a cached tensor is the extracted one, bit for bit, and its views come from a '
                                    'forked random stream either way'),
    'feature_cache_dir': setting('outputs', numbers=False, effect='where that cache lives', flags='resume path'),
    'view_backend': setting('run', numbers=False, flags='resume',
                            effect='PIL or tensor views are the same pixels from the same random numbers '
                                   '(tests/test_device_views.py)'),
    'channels_last': setting('numerics', False, numbers=True, effect=f'AlexNet, {ROUNDING}',
                             flags='checkpoint cache_key'),
    'cpu_flow_kernel': setting('numerics', numbers=True, flags='machine',
                               effect=f"{ROUNDING}: the same products through MKL or oneDNN (tests/test_flow.py); "
                                      "official: PyTorch's default"),
    'bf16_autocast': setting('numerics', False, numbers=True, effect='bfloat16 AlexNet and flow',
                             flags='checkpoint cache_key machine auto'),
    # --- checkpoints, scoring, gradient maps ---
    'save_checkpoint': setting('outputs', numbers=False, flags='resume',
                               effect='writes the checkpoint at the end of a job; its reference views fork the '
                                      'random stream'),
    'save_best': setting('outputs', numbers=False, flags='resume',
                         effect='one more checkpoint file; its reference views fork the random stream'),
    'n_train_images': setting('data', 0, numbers=True, effect='which training images'),
    'val_fraction': setting('data', 0.0, numbers=True, effect='which training images'),
    'max_reference_images': setting('outputs', numbers=True,
                                    effect="the checkpoint's score statistics and --score threshold (ours)"),
    'threshold_fpr': setting('outputs', numbers=True, effect='the --score threshold (ours; not in the paper)'),
    'grad_map_viz': setting('outputs', numbers=False, flags='resume',
                            effect='runs after training and adds maps and a pixel AUROC; changes none of the '
                                   'image-level numbers'),
    # --- run ---
    'seed': setting('run', numbers=True, effect='which random stream; the paper states none', flags='checkpoint'),
    'seeds': setting('run', numbers=True, effect='which random streams', flags='jobs'),
    'device': setting('run', numbers=True, flags='resume',
                      effect=f'{ROUNDING} between CPU and GPU (official: a CUDA GPU); a resumed run may move'),
    'num_workers': setting('run', 0, numbers=True,
                           effect="on-line training views: each worker process draws from its own seed"),
    'verbose': setting('run', numbers=False, effect='what is printed', flags='resume'),
    'hide_tqdm_bar': setting('run', numbers=False, effect='progress bars only', flags='resume'),
    'resume_state': setting('run', numbers=False, effect='writes the --resume state; draws no random numbers',
                            flags='resume'),
    'resume_interval_s': setting('run', numbers=False, effect='how often that state is written', flags='resume'),
}

# settings an older config.py had, {name: (changes_numbers, why)}: a saved run that holds one is reported and
# resumes when it changed no number
RETIRED_SETTINGS = {}


def names_with(flag):
    """The settings that carry `flag` (one of FLAGS), in table order."""
    return tuple(name for name, row in SETTINGS.items() if flag in row.flags)


def names_in(group):
    """The settings of a typed group (data, views, model, training, numerics, outputs, run), in table order."""
    return tuple(name for name, row in SETTINGS.items() if group in row.groups)


def paper_values():
    """{name: the paper's or official value} of every setting that has one."""
    return {name: row.paper for name, row in SETTINGS.items() if row.paper is not NO_PAPER_VALUE}


GROUPS = ('data', 'views', 'model', 'training', 'numerics', 'outputs', 'run')
CHECKPOINT_SETTINGS = names_with('checkpoint')
FEATURE_CACHE_SETTINGS = names_with('cache_key')
RESUMABLE_SETTINGS = names_with('resume')
MACHINE_SETTINGS = names_with('machine')
POSITIVE_INTEGERS = names_with('positive')
PATH_SETTINGS = names_with('path')
AUTO_SETTINGS = names_with('auto')
PER_RUN_SETTINGS = names_with('jobs')
