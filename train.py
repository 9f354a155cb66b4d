"""The DifferNet training loop: Adam on the flow only, meta epochs of sub epochs, AUROC after each.

The AlexNet extractor is frozen, so it runs under no_grad and its features go straight into the flow;
the official code instead backpropagates through it at every step (the optimizer never updates it).
"""
import logging
import math
import os
import random
import time

import numpy as np
import torch

from base.atomic_files import WriteFailed
from base.metrics import auroc_or_nan
from base.resume_state import apply_resume_state, read_resume_state, save_resume_state
from base.settings import job_number_settings, settings_group
from freia_funcs import nll_loss
from model import (POOL_VIEW_SEED_OFFSET, TEST_VIEW_SEED_OFFSET, batch_features, dataset_features, score_view_features,
                   seeded_view_features)
from utils import MultiViewDataset, dataset_loader, progress, view_backend

logger = logging.getLogger(__name__)


def seed_everything(seed):
    """Seeds Python's, numpy's and torch's random streams."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def make_optimizer(flow, training):
    """Adam on the flow's parameters with the paper's values (settings group 'training')."""
    options = dict(lr=training.lr_init, betas=tuple(training.adam_betas), eps=training.adam_eps,
                   weight_decay=training.weight_decay)
    if training.adam_fused:
        options['fused'] = True
    return torch.optim.Adam(flow.parameters(), **options)


def flow_step(model, optimizer, features, max_grad_norm=0.0):
    """One Adam step on a batch of feature vectors (N, D), under the model's precision; returns the loss as a
    0-d tensor on the features' device (reading it would wait for the GPU at every step; `loss_values` reads
    many at once). `max_grad_norm` > 0 clips the flow's gradient norm first."""
    optimizer.zero_grad(set_to_none=True)
    with model.autocast():
        z, log_jac_det = model.nf(features)
    loss = nll_loss(z.float(), log_jac_det.float())
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.nf.parameters(), max_grad_norm)
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


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; `history` holds the meta epochs finished before."""

    def __init__(self, meta_epoch, sub_epoch, loss, history):
        super().__init__(f'loss is {loss} at meta epoch {meta_epoch}, sub epoch {sub_epoch}; results of the '
                         f'{len(history["auroc"])} meta epoch(s) before are kept. Try max_grad_norm (e.g. 1.0) '
                         f'or a lower lr_init')
        self.history = history


class TrainingState:
    """What the training of a class has so far: the history, the AUROC observer, the scores of the last and
    of the best meta epoch, and the meta epoch to start from (after a resume)."""

    def __init__(self):
        self.history = {'auroc': [], 'test_loss': [], 'train_loss': []}
        self.observer = ScoreObserver()
        self.scores = self.best_scores = None
        self.first_meta_epoch, self.elapsed_before = 0, 0.0

    def resume_from(self, path, state, model, optimizer):
        """Continues from a state of read_resume_state (flow, Adam, history, random streams) read at `path`."""
        apply_resume_state(path, state, model, optimizer)
        self.history = state['history']
        for epoch, auroc in enumerate(self.history['auroc']):
            self.observer.update(auroc, epoch)
        self.scores, self.best_scores = np.array(state['scores']), np.array(state['best_scores'])
        self.elapsed_before = state['elapsed_s']
        self.first_meta_epoch = state['meta_epoch'] + 1
        done = ' (the last: training is done, the checkpoint and results follow)' if state['optimizer'] is None else ''
        logger.info(f'resumed after meta epoch {state["meta_epoch"]}{done} from {path}')

    def write(self, path, meta_epoch, model, optimizer, settings, test_labels, elapsed):
        """Writes the state after `meta_epoch` for --resume (`optimizer` None after the last); returns whether
        it was written (a full disk is a warning: an earlier state, if any, stays whole and --resume starts
        there)."""
        try:
            save_resume_state(path, meta_epoch, model, optimizer, self.history, self.scores, self.best_scores,
                              self.elapsed_before + elapsed, settings, test_labels)
            return True
        except WriteFailed as error:
            logger.warning(f'warning: {error}; training goes on without a newer resume state (tried again after '
                           'the next meta epoch)')
            return False

    def record_evaluation(self, meta_epoch, scores, test_loss, auroc):
        """Adds one meta epoch's evaluation; returns True when its AUROC is a new maximum."""
        is_new_max = self.observer.update(auroc, meta_epoch)
        if is_new_max:
            self.best_scores = scores
        self.scores = scores
        self.history['auroc'].append(auroc)
        self.history['test_loss'].append(test_loss)
        return is_new_max

    def finished_history(self, test_labels, elapsed):
        """The history with the last and max AUROC, the test scores of both and the wall time."""
        observer = self.observer
        self.history.update(
            last_auroc=observer.last, max_auroc=observer.max_score, max_auroc_epoch=observer.max_epoch,
            test_scores=[float(s) for s in self.scores] if self.scores is not None else [],
            best_test_scores=[float(s) for s in self.best_scores] if self.best_scores is not None else [],
            test_labels=[int(label) for label in test_labels], wall_time_s=round(self.elapsed_before + elapsed, 2))
        return self.history


def test_features_source(model, test_samples, config, device):
    """(features_of(meta_epoch), labels) of the test set: with cache_test_features its views are drawn and
    extracted once (from the seed); otherwise they are drawn anew from the run's stream at every meta epoch,
    as the official code does."""
    if config.cache_test_features:
        features, labels = seeded_view_features(
            model, test_samples, config.n_transforms_test, config.seed + TEST_VIEW_SEED_OFFSET, config, device,
            'test views', fixed_rotations=config.fixed_test_rotations)
        return (lambda meta_epoch: features), labels
    test_set = MultiViewDataset(test_samples, config.n_transforms_test, settings_group(config, 'views'),
                                fixed_rotations=config.fixed_test_rotations, keep_images=True,
                                backend=view_backend(config.view_backend, device))
    loader = dataset_loader(test_set, config.batch_size_test, False, config.num_workers, device)
    return (lambda meta_epoch: dataset_features(model, loader, device, config.hide_tqdm_bar,
                                                f'test {meta_epoch}')[0]), test_set.labels


def training_batches_source(model, train_samples, config, device):
    """A function returning one sub epoch's batches of feature vectors (n_images * n_transforms, D): views
    made and extracted on-line (the official behaviour), or drawn from a pool extracted once."""
    if config.train_feature_pool > 0:
        pool, _ = seeded_view_features(model, train_samples, config.train_feature_pool,
                                       config.seed + POOL_VIEW_SEED_OFFSET, config, device, 'training pool')
        return lambda: pool_batches(pool, config.batch_size, config.n_transforms)
    train_set = MultiViewDataset(train_samples, config.n_transforms, settings_group(config, 'views'), keep_images=True,
                                 backend=view_backend(config.view_backend, device))
    loader = dataset_loader(train_set, config.batch_size, True, config.num_workers, device)
    return lambda: (features.reshape(-1, features.shape[-1])
                    for features, _ in batch_features(model, loader, device))


def train_sub_epoch(model, optimizer, batches, config, label, steps):
    """One pass over `batches` with a flow step each; returns the step losses as floats (read once at the
    end: reading each would wait for a GPU at every step)."""
    losses = []
    bar = progress(batches, config.hide_tqdm_bar, f'train {label}', total=steps)
    for batch in bar:
        losses.append(flow_step(model, optimizer, batch, config.max_grad_norm))
        if not bar.disable:  # a shown bar reads every loss
            bar.set_postfix(loss=f'{float(losses[-1]):.4f}', refresh=False)
    bar.close()
    return loss_values(losses)


def evaluate(model, test_features, test_labels, batch_size_test):
    """(scores, test loss, AUROC) of the test set with the flow in eval mode."""
    scores, test_loss = score_view_features(model, test_features, batch_size_test)
    return scores, test_loss, auroc_or_nan(test_labels, scores)


def log_evaluation(verbose, meta_epoch, test_loss, auroc, observer):
    if verbose:
        logger.info(f'Epoch: {meta_epoch} \t test_loss: {test_loss:.4f}')
    if math.isnan(auroc):
        logger.info('AUROC: not defined (the test set has no anomalous images)')
    else:
        logger.info(f'AUROC: last {auroc:.4f} max {observer.max_score:.4f} epoch_max {observer.max_epoch}')


def train_class(model, train_samples, test_samples, config, device, on_meta_epoch=None, resume_path=None):
    """Trains the flow of `model` on `train_samples`, evaluating on `test_samples` after every meta epoch.

    Samples are image_data.image_files.Sample. Returns the history: AUROC and test loss per meta epoch, train loss per sub
    epoch, last and max AUROC with the 0-based meta epoch of the max, the test scores of the last and of
    the best meta epoch, the wall time. `on_meta_epoch(meta_epoch, history, scores, is_new_max)`, if given,
    is called after each evaluation. With `resume_path`, the state after a meta epoch is written there (at
    most every resume_interval_s, and always after the last), and a state found there at the start is
    continued from: the one after the last meta epoch returns its history at once. Raises TrainingDiverged
    on a NaN/inf loss.
    """
    start = time.time()
    model.prepare(settings_group(config, 'numerics'), device)
    optimizer = make_optimizer(model.nf, settings_group(config, 'training'))
    state = TrainingState()
    settings = job_number_settings(config)
    saved = read_resume_state(resume_path, settings) if resume_path and os.path.isfile(resume_path) else None
    if saved is not None and saved['meta_epoch'] == config.meta_epochs - 1:
        # trained before a failure after training: no views to extract, straight to what follows
        state.resume_from(resume_path, saved, model, optimizer)
        return state.finished_history(saved['test_labels'], time.time() - start)
    test_features_of, test_labels = test_features_source(model, test_samples, config, device)
    sub_epoch_batches = training_batches_source(model, train_samples, config, device)
    if saved is not None:
        state.resume_from(resume_path, saved, model, optimizer)
    steps_per_epoch = math.ceil(len(train_samples) / config.batch_size)
    last_state_write = start
    for meta_epoch in range(state.first_meta_epoch, config.meta_epochs):
        model.train()
        if config.verbose:
            logger.info(f'\nTrain epoch {meta_epoch}')
        epoch_losses = []
        for sub_epoch in range(config.sub_epochs):
            losses = train_sub_epoch(model, optimizer, sub_epoch_batches(), config, f'{meta_epoch}.{sub_epoch}',
                                     steps_per_epoch)
            diverged = [loss for loss in losses if not math.isfinite(loss)]  # a step after a NaN changes nothing kept
            if diverged:
                raise TrainingDiverged(meta_epoch, sub_epoch, diverged[0],
                                       state.finished_history(test_labels, time.time() - start))
            epoch_losses.append(float(np.mean(losses)))
            if config.verbose:
                logger.info(f'Epoch: {meta_epoch}.{sub_epoch} \t train loss: {epoch_losses[-1]:.4f}')
        state.history['train_loss'].append(epoch_losses)
        scores, test_loss, auroc = evaluate(model, test_features_of(meta_epoch), test_labels, config.batch_size_test)
        is_new_max = state.record_evaluation(meta_epoch, scores, test_loss, auroc)
        log_evaluation(config.verbose, meta_epoch, test_loss, auroc, state.observer)
        last = meta_epoch == config.meta_epochs - 1
        # between writes at most resume_interval_s of training is redone by --resume; the state after the
        # last meta epoch is always written, so that a failure after training costs no training again
        if resume_path and (last or time.time() - last_state_write >= config.resume_interval_s):
            if state.write(resume_path, meta_epoch, model, None if last else optimizer, settings, test_labels,
                           time.time() - start):
                last_state_write = time.time()
        if on_meta_epoch is not None:
            on_meta_epoch(meta_epoch, state.history, scores, is_new_max)
    return state.finished_history(test_labels, time.time() - start)
