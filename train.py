"""The DifferNet training loop: Adam on the flow only, meta epochs of sub epochs, AUROC after each.

The AlexNet extractor is frozen, so it runs under no_grad and its features go straight into the flow;
the official code instead backpropagates through it at every step (the optimizer never updates it).
"""
import math
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader
from tqdm import tqdm

from freia_funcs import nll_loss


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


def extract_view_features(model, views, chunk_size):
    """Features (N, D) of the views (N, 3, s, s), without gradient, `chunk_size` views per AlexNet pass."""
    with torch.no_grad():
        return torch.cat([model.features(chunk) for chunk in views.split(chunk_size)])


def iterate_features(model, loader, device, config, description=''):
    """Yields (features (B, n_views, D), labels (B,)) for each batch of a MultiViewDataset loader."""
    bar = tqdm(loader, desc=description, disable=config.hide_tqdm_bar, leave=False, mininterval=5)
    for views, labels in bar:
        n_images, n_views = views.shape[:2]
        flat = views.to(device, non_blocking=True).view(-1, *views.shape[2:])
        yield extract_view_features(model, flat, config.extract_batch_size).view(n_images, n_views, -1), labels


def extract_all_features(model, loader, device, config, description=''):
    """Features (N_images, n_views, D) and labels (N_images,) of a whole dataset, in loader order."""
    features, labels = [], []
    for batch_features, batch_labels in iterate_features(model, loader, device, config, description):
        features.append(batch_features)
        labels.append(batch_labels)
    return torch.cat(features), torch.cat(labels).numpy()


def flow_step(model, optimizer, features):
    """One Adam step on a batch of feature vectors (N, D); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    z, log_jac_det = model.nf(features)
    loss = nll_loss(z, log_jac_det)
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


def score_features(model, test_features, batch_size_test):
    """Anomaly score of each image (mean z^2 over its views and dimensions) and the test loss (the mean
    over batches of `batch_size_test` images of the training loss), as the official evaluation."""
    scores, losses = [], []
    with torch.no_grad():
        for batch in test_features.split(batch_size_test):
            z, log_jac_det = model.nf(batch.reshape(-1, batch.shape[-1]))
            losses.append(nll_loss(z, log_jac_det).item())
            scores.append(torch.mean(z.view(*batch.shape) ** 2, dim=(-2, -1)).float().cpu())
    return torch.cat(scores).numpy(), float(np.mean(losses))


def image_auroc(labels, scores):
    """roc_auc_score, or nan when the test set holds one label only (AUROC is undefined then)."""
    if len(np.unique(labels)) < 2:
        return float('nan')
    return float(roc_auc_score(labels, scores))


def train_class(model, train_set, test_set, config, device, log=print):
    """Trains the flow of `model` on `train_set`, evaluating on `test_set` after every meta epoch.

    Returns the history: AUROC and test loss per meta epoch, train loss per sub epoch, last and max
    AUROC with the 0-based meta epoch of the max, the test scores of the last epoch and the wall time.
    """
    start = time.time()
    model.to(device)
    optimizer = make_optimizer(model.nf, config)
    observer = ScoreObserver()
    history = {'auroc': [], 'test_loss': [], 'train_loss': []}
    train_loader = make_loader(train_set, config.batch_size, True, config)
    test_loader = make_loader(test_set, config.batch_size_test, False, config)
    for meta_epoch in range(config.meta_epochs):
        model.train()
        if config.verbose:
            log(f'\nTrain epoch {meta_epoch}')
        epoch_losses = []
        for sub_epoch in range(config.sub_epochs):
            features = iterate_features(model, train_loader, device, config, f'train {meta_epoch}.{sub_epoch}')
            losses = [flow_step(model, optimizer, batch.reshape(-1, batch.shape[-1])) for batch, _ in features]
            epoch_losses.append(float(np.mean(losses)))
            if config.verbose:
                log(f'Epoch: {meta_epoch}.{sub_epoch} \t train loss: {epoch_losses[-1]:.4f}')
        history['train_loss'].append(epoch_losses)

        model.eval()
        test_features, labels = extract_all_features(model, test_loader, device, config, f'test {meta_epoch}')
        scores, test_loss = score_features(model, test_features, config.batch_size_test)
        auroc = image_auroc(labels, scores)
        observer.update(auroc, meta_epoch)
        history['auroc'].append(auroc)
        history['test_loss'].append(test_loss)
        if config.verbose:
            log(f'Epoch: {meta_epoch} \t test_loss: {test_loss:.4f}')
        log(f'AUROC: last {auroc:.4f} max {observer.max_score:.4f} epoch_max {observer.max_epoch}')
    history.update(last_auroc=observer.last, max_auroc=observer.max_score, max_auroc_epoch=observer.max_epoch,
                   test_scores=[float(s) for s in scores], test_labels=[int(l) for l in labels],
                   wall_time_s=round(time.time() - start, 2))
    return history
