"""Exact pixel metrics, every pixel pooled in memory: the references the streamed ones in metrics.py are
checked against (tests) and measured against (benchmarks/pixel_metrics_memory.py, gradient_map_ops.py); no run
uses them, they hold every pixel at once."""
import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from base.metrics import AUPRO_MAX_FPR, EIGHT_NEIGHBOURS, area_under_pro, upsample_map


def flatten_pairs(maps, masks):
    """Every pixel of every (map, mask) pair at mask resolution: (scores, truths) 1-D arrays."""
    scores = np.concatenate([upsample_map(m, mask.shape).ravel() for m, mask in zip(maps, masks)])
    truths = np.concatenate([mask.ravel() for mask in masks])
    return scores, truths


def pixel_auroc_exact(maps, masks):
    """Reference for pixel_auroc: all pixels pooled in memory (several GB for a big class), sklearn's
    AUROC; nan when the pooled masks hold only one class."""
    scores, truths = flatten_pairs(maps, masks)
    if truths.all() or not truths.any():
        return float('nan')
    return float(roc_auc_score(truths, scores))


def aupro_exact(maps, masks, max_fpr=AUPRO_MAX_FPR):
    """Reference for aupro: all pixels pooled in memory and sorted.

    For a threshold t: PRO(t) = mean over the (8-)connected defect regions R of all masks of
    |{p in R: map(p) > t}| / |R|, FPR(t) = share of defect-free pixels with map > t. Sweeping t over
    every pixel value, each defect pixel adds 1 / (|R| * n_regions) to PRO and each defect-free pixel
    1 / n_negatives to FPR, so both curves are cumulative sums over the pixels in decreasing score.
    nan without defect regions or defect-free pixels.
    """
    weights_per_image = []
    n_regions = 0
    for mask in masks:
        regions, count = ndimage.label(mask, structure=EIGHT_NEIGHBOURS)
        areas = np.bincount(regions.ravel())
        weight = np.where(regions > 0, 1.0 / areas[regions], 0.0)
        weights_per_image.append(weight.ravel())
        n_regions += count
    scores, truths = flatten_pairs(maps, masks)
    n_negatives = int((~truths).sum())
    if n_regions == 0 or n_negatives == 0:
        return float('nan')
    region_weights = np.concatenate(weights_per_image) / n_regions
    order = np.argsort(-scores, kind='stable')
    sorted_scores = scores[order]
    pro = np.cumsum(region_weights[order])
    fpr = np.cumsum(~truths[order]) / n_negatives
    # equal scores pass a threshold together: keep the last index of each run of equal values
    last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    return area_under_pro(np.r_[0.0, fpr[last_of_run]], np.r_[0.0, pro[last_of_run]], max_fpr)
