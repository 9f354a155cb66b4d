"""The DifferNet training loop: Adam on the flow only, meta epochs of sub epochs, AUROC after each.

The AlexNet extractor is frozen, so it runs under no_grad and its features go straight into the flow;
the official code instead backpropagates through it at every step (the optimizer never updates it).
"""
import math
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from freia_funcs import nll_loss
from utils import (MultiViewDataset, auroc_or_nan, feature_cache_key, load_cached_features,
                   save_cached_features)


class ScoreObserver:
    """The official `Score_Observer`: the last score, the highest so far and its 0-based meta epoch."""

    def __init__(self):
        self.last = None
        self.max_score = None
        self.max_epoch = 0

    def update(self, score, epoch):
        """Records `score`; returns True when it is a new maximum (the first epoch always is)."""
        self.last = score
        is_new_max = (epoch == 0 or score > self.max_score
                      or (math.isnan(self.max_score) and not math.isnan(score)))
        if is_new_max:
            self.max_score, self.max_epoch = score, epoch
        return is_new_max


def make_optimizer(flow, config):
    """Adam on the flow's parameters with the paper's values."""
    options = dict(lr=config.lr_init, betas=tuple(config.adam_betas), eps=config.adam_eps,
                   weight_decay=config.weight_decay)
    if config.adam_fused:
        options['fused'] = True
    return torch.optim.Adam(flow.parameters(), **options)


def make_loader(dataset, batch_size, shuffle, config):
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=config.num_workers,
                      persistent_workers=config.num_workers > 0)


def autocast(config, device):
    """bfloat16 autocast when `bf16_autocast` is set, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(config.bf16_autocast))


def prepare_extractor(model, config):
    if config.channels_last:
        model.feature_extractor.to(memory_format=torch.channels_last)


def extract_view_features(model, views, config):
    """Features (N, D) in float32 of the views (N, 3, s, s), without gradient, `extract_batch_size` views
    per AlexNet pass."""
    features = []
    with torch.no_grad(), autocast(config, views.device):
        for chunk in views.split(config.extract_batch_size):
            if config.channels_last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            features.append(model.features(chunk).float())
    return torch.cat(features)


def iterate_features(model, loader, device, config):
    """Yields (features (B, n_views, D), labels (B,)) for each batch of a MultiViewDataset loader."""
    for views, labels in loader:
        n_images, n_views = views.shape[:2]
        flat = views.to(device, non_blocking=True).view(-1, *views.shape[2:])
        yield extract_view_features(model, flat, config).view(n_images, n_views, -1), labels


def extract_all_features(model, loader, device, config, description=''):
    """Features (N_images, n_views, D) and labels (N_images,) of a whole dataset, in loader order."""
    features, labels = [], []
    batches = iterate_features(model, loader, device, config)
    for batch_features, batch_labels in progress(batches, config, description, total=len(loader)):
        features.append(batch_features)
        labels.append(batch_labels)
    return torch.cat(features), torch.cat(labels).numpy()


def fixed_view_features(model, samples, n_views, view_seed, config, device, description, log=print,
                        fixed_rotations=False):
    """Features (N_images, n_views, D) of views drawn once from `view_seed`, from the disk cache when
    it holds exactly these files, settings, seed and weights; computed (and stored) otherwise."""
    dataset = MultiViewDataset(samples, n_views, config, fixed_rotations=fixed_rotations, view_seed=view_seed)
    key = None
    if config.feature_cache:
        key = feature_cache_key(samples, n_views, view_seed, fixed_rotations, model.extractor_digest(), config)
        cached = load_cached_features(config.feature_cache_dir, key)
        if cached is not None:
            log(f'{description}: {len(samples)} images x {n_views} views from the feature cache')
            return cached[0].to(device), cached[1]
    started = time.time()
    features, labels = extract_all_features(model, make_loader(dataset, max(1, config.extract_batch_size // n_views),
                                                               False, config), device, config, description)
    log(f'{description}: extracted {len(samples)} images x {n_views} views in {time.time() - started:.1f} s')
    if key is not None:
        save_cached_features(config.feature_cache_dir, key, features, labels)
    return features, labels


def flow_step(model, optimizer, features, config):
    """One Adam step on a batch of feature vectors (N, D); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(config, features.device):
        z, log_jac_det = model.nf(features)
    loss = nll_loss(z.float(), log_jac_det.float())
    loss.backward()
    optimizer.step()
    return loss.item()


def pool_batches(pool, batch_size, n_views):
    """Official-like batches from a feature pool (N_images, K, D): images shuffled, then `batch_size`
    images per step, each contributing `n_views` of its K pooled views drawn without replacement."""
    n_images, pool_size = pool.shape[:2]
    for image_ids in torch.randperm(n_images).split(batch_size):
        picks = torch.rand(len(image_ids), pool_size).argsort(dim=1)[:, :n_views]
        yield pool[image_ids.unsqueeze(1), picks.to(pool.device)].reshape(-1, pool.shape[-1])


def score_features(model, test_features, config):
    """Anomaly score of each image (mean z^2 over its views and dimensions) and the test loss (the mean
    over batches of `batch_size_test` images of the training loss), as the official evaluation."""
    scores, losses = [], []
    with torch.no_grad(), autocast(config, test_features.device):
        for batch in test_features.split(config.batch_size_test):
            z, log_jac_det = model.nf(batch.reshape(-1, batch.shape[-1]))
            z, log_jac_det = z.float(), log_jac_det.float()
            losses.append(nll_loss(z, log_jac_det).item())
            scores.append(torch.mean(z.view(*batch.shape) ** 2, dim=(-2, -1)).float().cpu())
    return torch.cat(scores).numpy(), float(np.mean(losses))


def progress(iterable, config, description, total=None):
    """A tqdm bar when `hide_tqdm_bar` is off; in a log file (not a terminal) it redraws at most every
    30 s, so it cannot flood the file."""
    interval = 0.5 if sys.stderr.isatty() else 30
    return tqdm(iterable, desc=description, total=total, disable=config.hide_tqdm_bar, leave=False,
                mininterval=interval, maxinterval=max(interval, 10), dynamic_ncols=True)


TEST_VIEW_SEED_OFFSET = 1_000  # view seeds of the cached test views and of the training pool, kept
POOL_VIEW_SEED_OFFSET = 2_000  # apart from each other and from the run's own torch seed


def train_class(model, train_samples, test_samples, config, device, log=print, on_meta_epoch=None):
    """Trains the flow of `model` on `train_samples`, evaluating on `test_samples` after every meta epoch.

    Samples are (path, label, defect_type). Returns the history: AUROC and test loss per meta epoch,
    train loss per sub epoch, last and max AUROC with the 0-based meta epoch of the max, the test scores
    of the last meta epoch and the wall time. `on_meta_epoch(meta_epoch, history, scores, is_new_max)`, if
    given, is called after each evaluation (checkpoints hook in there).
    """
    start = time.time()
    model.to(device)
    prepare_extractor(model, config)
    optimizer = make_optimizer(model.nf, config)
    observer = ScoreObserver()
    history = {'auroc': [], 'test_loss': [], 'train_loss': []}

    test_features = test_labels = pool = None
    if config.cache_test_features:
        test_features, test_labels = fixed_view_features(
            model, test_samples, config.n_transforms_test, config.seed + TEST_VIEW_SEED_OFFSET, config, device,
            'test views', log, fixed_rotations=config.fixed_test_rotations)
    else:
        test_set = MultiViewDataset(test_samples, config.n_transforms_test, config,
                                    fixed_rotations=config.fixed_test_rotations)
        test_loader = make_loader(test_set, config.batch_size_test, False, config)
    if config.train_feature_pool > 0:
        pool, _ = fixed_view_features(model, train_samples, config.train_feature_pool,
                                      config.seed + POOL_VIEW_SEED_OFFSET, config, device, 'training pool', log)
    else:
        train_loader = make_loader(MultiViewDataset(train_samples, config.n_transforms, config),
                                   config.batch_size, True, config)

    steps_per_epoch = math.ceil(len(train_samples) / config.batch_size)
    best_scores = None
    for meta_epoch in range(config.meta_epochs):
        model.train()
        if config.verbose:
            log(f'\nTrain epoch {meta_epoch}')
        epoch_losses = []
        for sub_epoch in range(config.sub_epochs):
            if pool is not None:
                batches = pool_batches(pool, config.batch_size, config.n_transforms)
            else:
                batches = (features.reshape(-1, features.shape[-1])
                           for features, _ in iterate_features(model, train_loader, device, config))
            losses = []
            bar = progress(batches, config, f'train {meta_epoch}.{sub_epoch}', total=steps_per_epoch)
            for batch in bar:
                losses.append(flow_step(model, optimizer, batch, config))
                bar.set_postfix(loss=f'{losses[-1]:.4f}', refresh=False)
            epoch_losses.append(float(np.mean(losses)))
            if config.verbose:
                log(f'Epoch: {meta_epoch}.{sub_epoch} \t train loss: {epoch_losses[-1]:.4f}')
        history['train_loss'].append(epoch_losses)

        model.eval()
        if not config.cache_test_features:
            test_features, test_labels = extract_all_features(model, test_loader, device, config, f'test {meta_epoch}')
        scores, test_loss = score_features(model, test_features, config)
        auroc = auroc_or_nan(test_labels, scores)
        is_new_max = observer.update(auroc, meta_epoch)
        if is_new_max:
            best_scores = scores
        history['auroc'].append(auroc)
        history['test_loss'].append(test_loss)
        if config.verbose:
            log(f'Epoch: {meta_epoch} \t test_loss: {test_loss:.4f}')
        log(f'AUROC: last {auroc:.4f} max {observer.max_score:.4f} epoch_max {observer.max_epoch}')
        if on_meta_epoch is not None:
            on_meta_epoch(meta_epoch, history, scores, is_new_max)
    history.update(last_auroc=observer.last, max_auroc=observer.max_score, max_auroc_epoch=observer.max_epoch,
                   test_scores=[float(s) for s in scores], best_test_scores=[float(s) for s in best_scores],
                   test_labels=[int(label) for label in test_labels],
                   wall_time_s=round(time.time() - start, 2))
    return history
