"""The disk cache of extracted AlexNet features, keyed by everything they depend on."""
import hashlib
import json
import logging
import os

import torch

from base.atomic_files import file_sha256, replace_atomically
from base.settings_table import FEATURE_CACHE_SETTINGS

logger = logging.getLogger(__name__)

FEATURE_CACHE_FORMAT = 4  # raise when what a cache file holds, or how its key is made, changes


def feature_cache_key(samples, n_views, view_seed, fixed_rotations, weights_digest, config, device):
    """A digest of everything extracted features depend on: each file (path and the sha256 of its bytes:
    a data folder copied afresh, with new modification times, still finds its features; any changed byte
    does not), the transform and extractor settings, the number of views, their seed, the AlexNet weights,
    and the arithmetic: device type, torch version and, on CUDA, TF32 (other kernels round otherwise)."""
    files = [[os.path.abspath(sample.path), file_sha256(sample.path), sample.label, sample.defect_type]
             for sample in samples]
    arithmetic = {'device': torch.device(device).type, 'torch': torch.__version__}
    if arithmetic['device'] == 'cuda':
        arithmetic['tf32'] = [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]
    key = {'format': FEATURE_CACHE_FORMAT, 'files': files, 'n_views': n_views, 'view_seed': view_seed,
           'fixed_rotations': fixed_rotations, 'weights': weights_digest, 'arithmetic': arithmetic,
           'settings': {name: getattr(config, name) for name in FEATURE_CACHE_SETTINGS}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()


def load_cached_features(cache_dir, key):
    """(features, labels) stored under `key`, or None; a damaged file (truncated, altered) says so and is
    None: its features are extracted again and the file replaced."""
    path = os.path.join(cache_dir, f'features_{key}.pt')
    if not os.path.isfile(path):
        return None
    try:
        stored = torch.load(path, map_location='cpu', weights_only=True)
        if stored.get('key') != key:
            raise ValueError('it holds another key')
    except Exception as error:  # a damaged cache file is recomputed, never trusted
        logger.warning(f'warning: feature cache file {path} is damaged ({type(error).__name__}); extracting its '
                       f'features again and replacing it')
        return None
    return stored['features'], stored['labels'].numpy()


def save_cached_features(cache_dir, key, features, labels):
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f'features_{key}.pt')
    stored = {'key': key, 'features': features.cpu(), 'labels': torch.as_tensor(labels)}
    replace_atomically(path, lambda part: torch.save(stored, part))
