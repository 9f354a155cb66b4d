"""The paper's and the official code's value of every setting that has one, and how a run differs from them.

Every setting of config.py is in exactly one of PAPER_VALUES, NUMBER_NEUTRAL_SETTINGS and
SETTINGS_WITHOUT_PAPER_VALUE (tests/test_deviations.py): a setting that can change a number and has a
paper/official value is compared with it here, and printed with every result when it differs.
"""
from settings import same_value

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
                    channels_last=False, bf16_autocast=False, val_fraction=0.0, n_train_images=0, max_grad_norm=0.0, weights_path='',
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
    'extract_batch_size': 'views per AlexNet pass: float rounding only (docs/faithfulness.md); '
                          'the official code passes a batch\'s 96 training views or an image\'s 64 test views at once',
    'extract_batch_size_cuda': 'the same on a CUDA device',
    'cpu_flow_kernel': 'float rounding only: the same products through MKL or oneDNN (tests/test_flow.py); '
                       'official: PyTorch\'s default',
    'max_reference_images': 'the checkpoint\'s score statistics and --score threshold (ours; not in the paper)',
    'threshold_fpr': 'the --score threshold (ours; not in the paper)',
}


def deviations_from_paper(config):
    """[(name, value, paper value)] for every setting that can change a number and differs."""
    return [(name, getattr(config, name), reference) for name, reference in PAPER_VALUES.items()
            if not same_value(getattr(config, name), reference)]
