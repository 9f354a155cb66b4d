"""From views to AlexNet features: the loaders, the views per AlexNet pass, and the features of a set of
images with views drawn once from a seed, from the disk cache when it holds them.

`extract_view_features` is the one place where AlexNet runs without gradient (localization.py runs it with
gradient for the maps); every other function here feeds it.
"""
import sys
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from atomic_files import WriteFailed
from feature_cache import feature_cache_key, load_cached_features, save_cached_features
from utils import MultiViewDataset, normalize_views, resolve_view_backend

TEST_VIEW_SEED_OFFSET = 1_000  # view seeds of the cached test views and of the training pool, kept
POOL_VIEW_SEED_OFFSET = 2_000  # apart from each other and from the run's own torch seed


def view_backend(config, device):
    """'pil' or 'tensor': how the views are made (config.view_backend, 'auto' resolved for `device`)."""
    return resolve_view_backend(config.view_backend, device)


def extract_batch_size(config, device):
    """Views per AlexNet pass: `extract_batch_size` on the CPU, `extract_batch_size_cuda` on a GPU,
    where a pass of 16 views leaves most of it idle. Memory and float rounding only (docs/faithfulness.md)."""
    if device.type == 'cuda':
        return config.extract_batch_size_cuda
    return config.extract_batch_size


def autocast(config, device):
    """bfloat16 autocast when `bf16_autocast` is set, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(config.bf16_autocast))


def prepare_extractor(model, config):
    """Puts the AlexNet weights in the memory format the run's convolutions use (channels_last: NHWC)."""
    if config.channels_last:
        model.feature_extractor.to(memory_format=torch.channels_last)


def make_loader(dataset, batch_size, shuffle, config, device, log=print):
    """A DataLoader of a MultiViewDataset, with `num_workers` worker processes where they can start here;
    batches of views are pinned when they go to a CUDA `device`. The tensor backend loads in the main
    process: its items are a few random numbers, the views are made on the device from the kept images."""
    num_workers = usable_num_workers(dataset, config, log)
    makes_views_on_device = dataset.backend == 'tensor'
    pin_memory = device.type == 'cuda' and not makes_views_on_device
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=pin_memory)


def usable_num_workers(dataset, config, log):
    """config.num_workers, or 0 with a warning when worker processes cannot start here."""
    if config.num_workers == 0 or dataset.backend == 'tensor':
        return 0
    try:
        with torch.random.fork_rng(devices=[]):  # the probe must not move the run's random stream
            next(iter(DataLoader(torch.utils.data.Subset(dataset, [0]), num_workers=config.num_workers)))
        return config.num_workers
    except Exception as error:
        log(f'warning: DataLoader workers failed ({type(error).__name__}: {str(error)[:100]}); '
            f'loading images in the main process instead (num_workers = 0)')
        return 0


def extract_view_features(model, views, config):
    """Features (N, D) in float32 of the views (N, 3, s, s), without gradient, `extract_batch_size` views
    per AlexNet pass. uint8 views (MultiViewDataset.batch_pixels) are normalized one pass at a time, the
    same values as normalizing them all first, without a float copy of the whole batch."""
    features = []
    with torch.no_grad(), autocast(config, views.device):
        for chunk in views.split(extract_batch_size(config, views.device)):
            if chunk.dtype == torch.uint8:
                chunk = normalize_views(chunk, config.norm_mean, config.norm_std)
            # views normalized from PIL's pixels are channels-last already: no copy then
            chunk = chunk.contiguous(memory_format=torch.channels_last if config.channels_last
                                     else torch.contiguous_format)
            features.append(model.features(chunk).float())
    return torch.cat(features)


def loader_features(model, loader, device, config):
    """Yields (features (B, n_views, D), labels (B,)) for each batch of a MultiViewDataset loader."""
    for batch, labels in loader:
        views = loader.dataset.batch_pixels(batch, device)
        n_images, n_views = views.shape[:2]
        flat = views.view(-1, *views.shape[2:])
        yield extract_view_features(model, flat, config).view(n_images, n_views, -1), labels


def collect_features(model, loader, device, config, description=''):
    """Features (N_images, n_views, D) and labels (N_images,) of a whole dataset, in loader order."""
    features, labels = [], []
    batches = loader_features(model, loader, device, config)
    for batch_features, batch_labels in progress(batches, config, description, total=len(loader)):
        features.append(batch_features)
        labels.append(batch_labels)
    return torch.cat(features), torch.cat(labels).numpy()


def fixed_view_features(model, samples, n_views, view_seed, config, device, description, log=print,
                        fixed_rotations=False, images=None):
    """Features (N_images, n_views, D) of views drawn once from `view_seed`, from the disk cache when
    it holds exactly these files, settings, seed and weights; computed (and stored) otherwise. With
    `images` (RGB PIL images, one per sample, in memory) the views are made from them, never cached.

    Either way torch's global random stream is left as it was (a DataLoader draws its base seed from
    it even without workers), so training runs the same whether the features came from the cache."""
    with torch.random.fork_rng(devices=[]):
        dataset = MultiViewDataset(samples, n_views, config, fixed_rotations=fixed_rotations, view_seed=view_seed,
                                   backend=view_backend(config, device), images=images)
        key = None
        if config.feature_cache and images is None:
            key = feature_cache_key(samples, n_views, view_seed, fixed_rotations, model.extractor_digest(), config,
                                    device)
            cached = load_cached_features(config.feature_cache_dir, key, log)
            if cached is not None:
                log(f'{description}: {len(samples)} images x {n_views} views from the feature cache')
                return cached[0].to(device), cached[1]
        started = time.time()
        loader = make_loader(dataset, max(1, extract_batch_size(config, device) // n_views), False, config, device,
                             log)
        features, labels = collect_features(model, loader, device, config, description)
        log(f'{description}: extracted {len(samples)} images x {n_views} views in {time.time() - started:.1f} s')
        if key is not None:
            try:
                save_cached_features(config.feature_cache_dir, key, features, labels)
            except WriteFailed as error:
                log(f'warning: {error}; the run goes on without caching these features')
        return features, labels


def progress(iterable, config, description, total=None):
    """A tqdm bar when `hide_tqdm_bar` is off; in a log file (not a terminal) it redraws at most every
    30 s, so it cannot flood the file."""
    interval = 0.5 if sys.stderr.isatty() else 30
    return tqdm(iterable, desc=description, total=total, disable=config.hide_tqdm_bar, leave=False,
                mininterval=interval, maxinterval=max(interval, 10), dynamic_ncols=True)
