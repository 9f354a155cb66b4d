"""The DifferNet training loop: Adam on the flow only, meta epochs of sub epochs, AUROC after each.

The AlexNet extractor is frozen, so it runs under no_grad and its features go straight into the flow;
the official code instead backpropagates through it at every step (the optimizer never updates it).
"""
import math
import os
import random
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from freia_funcs import nll_loss
from utils import (MultiViewDataset, auroc_or_nan, feature_cache_key, load_cached_features,
                   replace_atomically, resolve_view_backend, save_cached_features)


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


def make_loader(dataset, batch_size, shuffle, config, num_workers=None, device=None):
    """A DataLoader of `dataset`; batches of views are pinned when they go to a CUDA `device`. The
    tensor backend loads in the main process: its items are a few random numbers, the views are made
    on the device from the kept images."""
    num_workers = config.num_workers if num_workers is None else num_workers
    makes_views_on_device = getattr(dataset, 'backend', 'pil') == 'tensor'  # tests pass plain datasets
    if makes_views_on_device:
        num_workers = 0
    pin_memory = device is not None and device.type == 'cuda' and not makes_views_on_device
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=pin_memory)


def view_backend(config, device):
    """'pil' or 'tensor': how the views are made (config.view_backend, 'auto' resolved for `device`)."""
    return resolve_view_backend(config.view_backend, device)


def extract_batch_size(config, device):
    """Views per AlexNet pass: `extract_batch_size` on the CPU, `extract_batch_size_cuda` on a GPU,
    where a pass of 16 views leaves most of it idle. Memory and float rounding only (batch 1 and 16
    differ by up to 2e-7)."""
    if device.type == 'cuda':
        return config.extract_batch_size_cuda
    return config.extract_batch_size


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
        for chunk in views.split(extract_batch_size(config, views.device)):
            if config.channels_last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            features.append(model.features(chunk).float())
    return torch.cat(features)


def batch_views(dataset, batch, device):
    """The views (B, n_views, 3, s, s) on `device` of a loader batch: PIL-made views are copied (without
    blocking only from pinned memory), tensor-backend recipes are made into views on the device."""
    if isinstance(batch, dict):
        return dataset.make_views(batch, device)
    return batch.to(device, non_blocking=batch.is_pinned())


def iterate_features(model, loader, device, config):
    """Yields (features (B, n_views, D), labels (B,)) for each batch of a MultiViewDataset loader."""
    for batch, labels in loader:
        views = batch_views(loader.dataset, batch, device)
        n_images, n_views = views.shape[:2]
        flat = views.view(-1, *views.shape[2:])
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
    it holds exactly these files, settings, seed and weights; computed (and stored) otherwise.

    Either way torch's global random stream is left as it was (a DataLoader draws its base seed from
    it even without workers), so training runs the same whether the features came from the cache."""
    with torch.random.fork_rng(devices=[]):
        dataset = MultiViewDataset(samples, n_views, config, fixed_rotations=fixed_rotations, view_seed=view_seed,
                                   backend=view_backend(config, device))
        key = None
        if config.feature_cache:
            key = feature_cache_key(samples, n_views, view_seed, fixed_rotations, model.extractor_digest(), config,
                                    device)
            cached = load_cached_features(config.feature_cache_dir, key)
            if cached is not None:
                log(f'{description}: {len(samples)} images x {n_views} views from the feature cache')
                return cached[0].to(device), cached[1]
        started = time.time()
        loader = make_loader(dataset, max(1, extract_batch_size(config, device) // n_views), False, config,
                             usable_num_workers(dataset, config, log), device)
        features, labels = extract_all_features(model, loader, device, config, description)
        log(f'{description}: extracted {len(samples)} images x {n_views} views in {time.time() - started:.1f} s')
        if key is not None:
            save_cached_features(config.feature_cache_dir, key, features, labels)
        return features, labels


def flow_step(model, optimizer, features, config):
    """One Adam step on a batch of feature vectors (N, D); returns the loss as a 0-d tensor on the
    features' device (reading it would wait for the GPU at every step; `loss_values` reads many at once)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(config, features.device):
        z, log_jac_det = model.nf(features)
    loss = nll_loss(z.float(), log_jac_det.float())
    loss.backward()
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.nf.parameters(), config.max_grad_norm)
    optimizer.step()
    return loss.detach()


def loss_values(losses):
    """Python floats of step losses (0-d tensors, or floats), with one device-to-host copy."""
    tensors = [loss.reshape(1).float() for loss in losses if torch.is_tensor(loss)]
    read = iter(torch.cat([t.to(tensors[0].device) for t in tensors]).cpu().tolist() if tensors else [])
    return [next(read) if torch.is_tensor(loss) else float(loss) for loss in losses]


def pool_batches(pool, batch_size, n_views):
    """Official-like batches from a feature pool (N_images, K, D): images shuffled, then `batch_size`
    images per step, each contributing `n_views` of its K pooled views drawn without replacement."""
    n_images, pool_size = pool.shape[:2]
    for image_ids in torch.randperm(n_images).split(batch_size):
        picks = torch.rand(len(image_ids), pool_size).argsort(dim=1)[:, :n_views]
        yield pool[image_ids.to(pool.device).unsqueeze(1), picks.to(pool.device)].reshape(-1, pool.shape[-1])


def score_features(model, test_features, config):
    """Anomaly score of each image (mean z^2 over its views and dimensions) and the test loss (the mean
    over batches of `batch_size_test` images of the training loss), as the official evaluation."""
    scores, losses = [], []
    with torch.no_grad(), autocast(config, test_features.device):
        for batch in test_features.split(config.batch_size_test):
            z, log_jac_det = model.nf(batch.reshape(-1, batch.shape[-1]))
            z, log_jac_det = z.float(), log_jac_det.float()
            losses.append(nll_loss(z, log_jac_det).reshape(1))
            scores.append(torch.mean(z.view(*batch.shape) ** 2, dim=(-2, -1)).float())
    # one copy to the host at the end, not a wait for the GPU per batch
    return torch.cat(scores).cpu().numpy(), float(np.mean(torch.cat(losses).double().cpu().numpy()))


def progress(iterable, config, description, total=None):
    """A tqdm bar when `hide_tqdm_bar` is off; in a log file (not a terminal) it redraws at most every
    30 s, so it cannot flood the file."""
    interval = 0.5 if sys.stderr.isatty() else 30
    return tqdm(iterable, desc=description, total=total, disable=config.hide_tqdm_bar, leave=False,
                mininterval=interval, maxinterval=max(interval, 10), dynamic_ncols=True)


TEST_VIEW_SEED_OFFSET = 1_000  # view seeds of the cached test views and of the training pool, kept
POOL_VIEW_SEED_OFFSET = 2_000  # apart from each other and from the run's own torch seed


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; `history` holds the meta epochs finished before."""

    def __init__(self, meta_epoch, sub_epoch, loss, history):
        super().__init__(f'loss is {loss} at meta epoch {meta_epoch}, sub epoch {sub_epoch}; results of the '
                         f'{len(history["auroc"])} meta epoch(s) before are kept. Try max_grad_norm (e.g. 1.0) '
                         f'or a lower lr_init')
        self.history = history


def usable_num_workers(dataset, config, log):
    """config.num_workers, or 0 with a warning when worker processes cannot start here."""
    if config.num_workers == 0 or getattr(dataset, 'backend', 'pil') == 'tensor':
        return 0
    try:
        with torch.random.fork_rng(devices=[]):  # the probe must not move the run's random stream
            next(iter(DataLoader(torch.utils.data.Subset(dataset, [0]), num_workers=config.num_workers)))
        return config.num_workers
    except Exception as error:
        log(f'warning: DataLoader workers failed ({type(error).__name__}: {str(error)[:100]}); '
            f'loading images in the main process instead (num_workers = 0)')
        return 0


def rng_state():
    numpy_state = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'python': random.getstate(),
            'numpy': [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    random.setstate(tuple(tuple(item) if isinstance(item, list) else item for item in state['python']))
    numpy_state = state['numpy']
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_resume_state(path, meta_epoch, model, optimizer, history, scores, best_scores, elapsed):
    """Everything needed to continue after `meta_epoch` exactly as if never stopped; written whole."""
    state = {'meta_epoch': meta_epoch, 'flow': model.nf.state_dict(), 'optimizer': optimizer.state_dict(),
             'history': history, 'scores': [float(s) for s in scores], 'best_scores': [float(s) for s in best_scores],
             'elapsed_s': elapsed, 'rng': rng_state()}
    replace_atomically(path, lambda part: torch.save(state, part))


def finish_history(history, observer, scores, best_scores, test_labels, elapsed):
    history.update(last_auroc=observer.last, max_auroc=observer.max_score, max_auroc_epoch=observer.max_epoch,
                   test_scores=[float(s) for s in scores] if scores is not None else [],
                   best_test_scores=[float(s) for s in best_scores] if best_scores is not None else [],
                   test_labels=[int(label) for label in test_labels], wall_time_s=round(elapsed, 2))
    return history


def train_class(model, train_samples, test_samples, config, device, log=print, on_meta_epoch=None,
                resume_path=None):
    """Trains the flow of `model` on `train_samples`, evaluating on `test_samples` after every meta epoch.

    Samples are utils.Sample. Returns the history: AUROC and test loss per meta epoch, train loss per sub
    epoch, last and max AUROC with the 0-based meta epoch of the max, the test scores of the last and of
    the best meta epoch, the wall time. `on_meta_epoch(meta_epoch, history, scores, is_new_max)`, if given,
    is called after each evaluation. With `resume_path`, the state after every meta epoch is written there,
    and a state found there at the start is continued from. Raises TrainingDiverged on a NaN/inf loss.
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
                                    fixed_rotations=config.fixed_test_rotations, keep_images=True,
                                    backend=view_backend(config, device))
        test_loader = make_loader(test_set, config.batch_size_test, False, config,
                                  usable_num_workers(test_set, config, log), device)
        test_labels = test_set.labels
    if config.train_feature_pool > 0:
        pool, _ = fixed_view_features(model, train_samples, config.train_feature_pool,
                                      config.seed + POOL_VIEW_SEED_OFFSET, config, device, 'training pool', log)
    else:
        train_set = MultiViewDataset(train_samples, config.n_transforms, config, keep_images=True,
                                     backend=view_backend(config, device))
        train_loader = make_loader(train_set, config.batch_size, True, config,
                                   usable_num_workers(train_set, config, log), device)

    first_meta_epoch, best_scores, scores, elapsed_before = 0, None, None, 0.0
    if resume_path and os.path.isfile(resume_path):
        # on the CPU: random-generator states must be CPU tensors; load_state_dict moves the rest
        state = torch.load(resume_path, map_location='cpu', weights_only=True)
        model.nf.load_state_dict(state['flow'])
        optimizer.load_state_dict(state['optimizer'])
        history = state['history']
        for epoch, auroc in enumerate(history['auroc']):
            observer.update(auroc, epoch)
        scores, best_scores = np.array(state['scores']), np.array(state['best_scores'])
        elapsed_before = state['elapsed_s']
        first_meta_epoch = state['meta_epoch'] + 1
        set_rng_state(state['rng'])
        log(f'resumed after meta epoch {state["meta_epoch"]} from {resume_path}')

    steps_per_epoch = math.ceil(len(train_samples) / config.batch_size)
    last_state_write = start
    for meta_epoch in range(first_meta_epoch, config.meta_epochs):
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
                if not bar.disable:  # a shown bar reads every loss; otherwise they are read once below
                    bar.set_postfix(loss=f'{float(losses[-1]):.4f}', refresh=False)
            # checked once per sub epoch: a step after a NaN changes nothing that is kept
            losses = loss_values(losses)
            diverged = [loss for loss in losses if not math.isfinite(loss)]
            if diverged:
                bar.close()
                elapsed = elapsed_before + time.time() - start
                raise TrainingDiverged(meta_epoch, sub_epoch, diverged[0], finish_history(
                    history, observer, scores, best_scores, test_labels, elapsed))
            epoch_losses.append(float(np.mean(losses)))
            if config.verbose:
                log(f'Epoch: {meta_epoch}.{sub_epoch} \t train loss: {epoch_losses[-1]:.4f}')
        history['train_loss'].append(epoch_losses)

        model.eval()
        if not config.cache_test_features:
            test_features, _ = extract_all_features(model, test_loader, device, config, f'test {meta_epoch}')
        scores, test_loss = score_features(model, test_features, config)
        auroc = auroc_or_nan(test_labels, scores)
        is_new_max = observer.update(auroc, meta_epoch)
        if is_new_max:
            best_scores = scores
        history['auroc'].append(auroc)
        history['test_loss'].append(test_loss)
        if config.verbose:
            log(f'Epoch: {meta_epoch} \t test_loss: {test_loss:.4f}')
        if math.isnan(auroc):
            log('AUROC: not defined (the test set has no anomalous images)')
        else:
            log(f'AUROC: last {auroc:.4f} max {observer.max_score:.4f} epoch_max {observer.max_epoch}')
        elapsed = elapsed_before + time.time() - start
        # after the last meta epoch nothing is left to resume; between writes at most resume_interval_s
        # of training is redone by --resume (each write is ~2 GB at paper size)
        if resume_path and meta_epoch < config.meta_epochs - 1 and \
                time.time() - last_state_write >= config.resume_interval_s:
            save_resume_state(resume_path, meta_epoch, model, optimizer, history, scores, best_scores, elapsed)
            last_state_write = time.time()
        if on_meta_epoch is not None:
            on_meta_epoch(meta_epoch, history, scores, is_new_max)
    return finish_history(history, observer, scores, best_scores, test_labels, elapsed_before + time.time() - start)


# --- scoring images with a trained model (the --score command and the checkpoint statistics) ---------

def prepare_model(model, settings, device):
    """The model as training left it for scoring: on `device`, extractor memory format as the run's
    (channels_last changes float rounding), eval mode."""
    model.to(device)
    prepare_extractor(model, settings)
    return model.eval()


def reference_view_features(model, samples, settings, device, description, log=print):
    """Features (N, n_views, D) of `samples` at the fixed rotations, with the view seed of the test views
    (it matters only with colour jitter on), so that scores match a run with fixed_test_rotations."""
    features, _ = fixed_view_features(model, samples, settings.n_transforms_test,
                                      settings.seed + TEST_VIEW_SEED_OFFSET, settings, device, description,
                                      log, fixed_rotations=True)
    return features


def scores_of_features(model, features, settings):
    """Anomaly score of each image (N,) from its view features (N, n_views, D); model in eval mode."""
    model.eval()
    return score_features(model, features, settings)[0]
