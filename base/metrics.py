"""Metrics: image AUROC per class and per defect type; pixel AUROC and AUPRO of gradient maps (ours).

Pixel-level AUROC and AUPRO are OUR extension: the paper reports neither (it shows maps qualitatively).
They are streamed: maps and masks go one image at a time, each map upsampled to its mask's resolution and
its pixels counted into PIXEL_METRIC_BINS score bins, so memory holds one image's pixels and a few
histograms, whatever the number and size of the masks (pooling every pixel needs several GB on MVTec
screw; base/exact_metrics.py keeps that exact reference).
"""
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.metrics import roc_auc_score

AUPRO_MAX_FPR = 0.3  # the MVTec AD convention: PRO integrated over false-positive rates 0..0.3
EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=int)  # defect regions: 8-connected, as the MVTec AD evaluation code
PIXEL_METRIC_BINS = 16384  # score bins of the streamed metrics; their error bounds shrink as 1 / bins
EDGE_SAMPLE_SIZE = 2_000_000  # at most this many map values (an even stride over all maps) place the bin edges


def auroc_or_nan(labels, scores):
    """Image AUROC, or nan when only one label is present (AUROC is undefined then)."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float('nan')
    return float(roc_auc_score(labels, scores))


def f1_max(labels, scores):
    """(the best image-level F1 over all thresholds, the threshold that gives it): anomalous when
    score > threshold; (nan, nan) when only one label is present."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if len(np.unique(labels)) < 2:
        return float('nan'), float('nan')
    candidates = np.unique(scores)
    # the thresholds between neighbouring scores, and one below all: every distinct decision once
    thresholds = np.r_[candidates[0] - 1.0, candidates[:-1]]
    values = [f1_at_threshold(labels, scores, threshold) for threshold in thresholds]
    best = int(np.argmax(values))
    return float(values[best]), float(thresholds[best])


def f1_at_threshold(labels, scores, threshold):
    """Image-level F1 of the decision score > threshold (anomalous = label 1)."""
    labels, predicted = np.asarray(labels) == 1, np.asarray(scores, dtype=np.float64) > threshold
    true_positives = int(np.sum(labels & predicted))
    if true_positives == 0:
        return 0.0
    precision, recall = true_positives / int(np.sum(predicted)), true_positives / int(np.sum(labels))
    return 2 * precision * recall / (precision + recall)


def defect_type_aurocs(defect_types, labels, scores):
    """{defect type: AUROC of that type's images against the normal test images}."""
    defect_types, labels, scores = np.asarray(defect_types), np.asarray(labels), np.asarray(scores)
    normal = labels == 0
    return {defect: auroc_or_nan(labels[normal | (defect_types == defect)], scores[normal | (defect_types == defect)])
            for defect in sorted(set(defect_types[labels == 1]))}


def upsample_map(heat_map, shape):
    """(s, s) map -> `shape` (the mask's resolution), bilinear, as float32 numpy."""
    tensor = torch.as_tensor(np.asarray(heat_map, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=tuple(shape), mode='bilinear', align_corners=False)[0, 0].numpy()


def score_bin_edges(maps, n_bins=PIXEL_METRIC_BINS):
    """Increasing float32 inner bin edges (at most n_bins - 1): quantiles of the maps' values at map
    resolution. Equal-count bins rather than equal-width ones because the maps span many orders of
    magnitude (one bright image would otherwise leave all others in the first bin); the metrics only
    depend on the order of scores, so where the edges sit changes nothing but the resolution. Upsampled
    values lie within their map's range, so every pixel falls into a bin."""
    total = sum(np.size(heat_map) for heat_map in maps)
    if total == 0:
        return np.zeros(0, dtype=np.float32)
    stride = max(1, -(-total // EDGE_SAMPLE_SIZE))
    sample = np.concatenate([np.asarray(heat_map, dtype=np.float32).ravel()[::stride] for heat_map in maps])
    edges = np.quantile(sample.astype(np.float64), np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    return np.unique(edges.astype(np.float32))


def pixel_histograms(maps, masks, edges):
    """Per score bin (bin k holds values in [edges[k-1], edges[k])): the defect-free pixel count, the
    defect pixel count, and the defect pixels' region mass (sum of 1 / |region| over them, regions
    8-connected per mask); and the number of regions. One (map, mask) pair in memory at a time."""
    n_bins = len(edges) + 1
    negatives, positives, region_mass = np.zeros(n_bins), np.zeros(n_bins), np.zeros(n_bins)
    n_regions = 0
    for heat_map, mask in zip(maps, masks, strict=True):
        mask = np.asarray(mask, dtype=bool)
        bins = np.searchsorted(edges, upsample_map(heat_map, mask.shape).ravel(), side='right')
        defect = mask.ravel()
        negatives += np.bincount(bins[~defect], minlength=n_bins)
        if not defect.any():
            continue
        regions, count = ndimage.label(mask, structure=EIGHT_NEIGHBOURS)
        areas = np.bincount(regions.ravel())
        defect_bins = bins[defect]
        positives += np.bincount(defect_bins, minlength=n_bins)
        region_mass += np.bincount(defect_bins, weights=1.0 / areas[regions.ravel()[defect]], minlength=n_bins)
        n_regions += count
    return negatives, positives, region_mass, n_regions


def area_under_pro(fpr, pro, max_fpr):
    """Normalised trapezoid area under the (fpr, pro) curve (fpr non-decreasing from 0) up to
    `max_fpr`, the curve's value there interpolated."""
    inside = fpr <= max_fpr
    end_pro = np.interp(max_fpr, fpr, pro)
    fpr, pro = np.r_[fpr[inside], max_fpr], np.r_[pro[inside], end_pro]
    return float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1]) / 2) / max_fpr)


def pixel_metrics(maps, masks, max_fpr=AUPRO_MAX_FPR, n_bins=PIXEL_METRIC_BINS):
    """Pixel AUROC and AUPRO of `maps` (a sequence: read twice) against `masks` (any iterable of
    boolean arrays, read once, so masks can be loaded lazily), each map upsampled bilinearly to its
    mask's resolution, all pixels pooled; binned on `score_bin_edges`.

    Returns {'pixel_auroc', 'aupro', 'pixel_auroc_max_error', 'aupro_max_error'}; the metrics are nan
    when the masks hold no defect pixels or no defect-free ones. Binning only loses the order of pixels
    within a bin, so the exact values (pixel_auroc_exact, aupro_exact) are within the max errors:
      AUROC: pairs (defect, defect-free) in one bin count 1/2, so |error| <= 1/2 sum_k P_k N_k / (P N);
      AUPRO: the curve between two bin edges is monotone, so its area differs from the chord's by at
      most half the box: |error| <= 1/2 sum_k dFPR_k dPRO_k / max_fpr over the bins below max_fpr
      (the whole box for the bin that max_fpr cuts).
    With equal-count bins both are of the order of 1 / n_bins (on bottle: see docs/faithfulness.md).
    """
    edges = score_bin_edges(maps, n_bins)
    negatives, positives, region_mass, n_regions = pixel_histograms(maps, masks, edges)
    n_negative, n_positive = negatives.sum(), positives.sum()
    result = dict.fromkeys(['pixel_auroc', 'aupro', 'pixel_auroc_max_error', 'aupro_max_error'], float('nan'))
    if n_negative == 0:
        return result
    if n_positive > 0:
        below = np.cumsum(negatives) - negatives
        pairs = n_positive * n_negative
        result['pixel_auroc'] = float(np.sum(positives * (below + 0.5 * negatives)) / pairs)
        result['pixel_auroc_max_error'] = float(0.5 * np.sum(positives * negatives) / pairs)
    if n_regions > 0:
        # thresholds from the top bin down: the pixels of a bin pass together
        fpr = np.r_[0.0, np.cumsum(negatives[::-1]) / n_negative]
        pro = np.r_[0.0, np.cumsum(region_mass[::-1]) / n_regions]
        result['aupro'] = area_under_pro(fpr, pro, max_fpr)
        boxes = (np.minimum(fpr[1:], max_fpr) - fpr[:-1]) * np.diff(pro)
        whole = fpr[1:] <= max_fpr
        cut = (fpr[:-1] < max_fpr) & ~whole  # the bin max_fpr falls in: only part of its chord counts
        result['aupro_max_error'] = float((0.5 * np.sum(boxes[whole]) + np.sum(boxes[cut])) / max_fpr)
    return result


def pixel_auroc(maps, masks, n_bins=PIXEL_METRIC_BINS):
    """Pixel-level AUROC, streamed and binned (see pixel_metrics); nan when the pooled masks hold only
    one class."""
    return pixel_metrics(maps, masks, n_bins=n_bins)['pixel_auroc']
