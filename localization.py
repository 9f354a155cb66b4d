"""Where the defect is: DifferNet's gradient maps, their export as PNGs, and pixel-level metrics.

Gradient map of one image x (paper Sec. 3.4; the official `export_gradient_maps`):

    x_i   = T_i(x), i = 0..n-1       views rotated by a_i = i * 360 / n degrees (n = n_transforms_test)
    L     = nll_loss(f(x_0), ..., f(x_{n-1}))   the training loss of the n views together
    g_i   = dL / dx_i                 (3, s, s), the gradient of that loss w.r.t. the input pixels
    g'_i  = G_3 * T_i^-1(g_i)         rotated back by -a_i, then Gaussian-blurred (sigma 3) per channel
    map   = (mean over views i and channels c of |g'_i,c|) ** 2          (s, s)

Rotation back and blur are the official scipy.ndimage calls with the official arguments: rotate
(cubic spline, reshape=False, zeros outside) and gaussian_filter (sigma 3, 'reflect' borders, radius
4 sigma), on CPU numpy. (Until issue 13 they were torchvision's bilinear rotation and a blur with
scipy-'mirror' borders; the effect of that on bottle is in docs/faithfulness.md.)

Pixels that raise the loss most (the least likely under the flow) light up. The AlexNet weights are
frozen, but the gradient still flows through them to the input, so nothing here runs under no_grad.

Pixel-level AUROC and AUPRO of these maps against the ground-truth masks are OUR extension: the paper
reports neither (it shows maps qualitatively only).
"""
import os

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from torchvision import transforms

from freia_funcs import nll_loss
from train import TEST_VIEW_SEED_OFFSET
from utils import MultiViewDataset, Sample, fixed_angles, load_rgb

matplotlib.use('Agg')  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

BLUR_SIGMA = 3.0  # paper and official code
BLUR_TRUNCATE = 4.0  # kernel radius in sigmas, scipy.ndimage.gaussian_filter's default (official blur)
AUPRO_MAX_FPR = 0.3  # the MVTec AD convention: PRO integrated over false-positive rates 0..0.3
EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=int)  # defect regions: 8-connected, as the MVTec AD evaluation code


def load_mask(path):
    """Boolean (H, W) array: True where the mask marks a defect (any non-zero pixel)."""
    with Image.open(path) as mask:
        return np.asarray(mask.convert('L')) > 0


# --- the map ---------------------------------------------------------------------------------------

def input_gradients(model, views, chunk_size=None):
    """(dL/dviews (n, 3, s, s), score): L = nll_loss of the views through `model`, the score the mean
    z^2 over views and dimensions (the image's anomaly score from the same pass).

    L is a mean over views of terms that each depend on one view only, so the views can go through in
    chunks of `chunk_size` (memory: AlexNet's activations are kept for the backward pass); each chunk's
    gradient is scaled by its share of the views, which gives the full pass's gradient.
    """
    chunk_size = chunk_size or len(views)
    gradients, squared_sum = [], 0.0
    for chunk in views.split(chunk_size):
        chunk = chunk.detach().clone().requires_grad_(True)
        z, log_jac_det = model(chunk)
        loss = nll_loss(z, log_jac_det) * (len(chunk) / len(views))
        # autograd.grad, not backward: the flow's own .grad fields stay untouched
        gradient, = torch.autograd.grad(loss, chunk)
        gradients.append(gradient)
        squared_sum += float(torch.sum(z.detach().double() ** 2))
    return torch.cat(gradients), squared_sum / (len(views) * model.n_features)


def rotate_back(maps, angles):
    """Undoes the view rotations: maps[i] (C, s, s), taken on the image rotated by angles[i] degrees
    (counter-clockwise, about the centre, as `utils.view_transform`), rotated by -angles[i] with the
    official call, scipy.ndimage.rotate(..., reshape=False) at its defaults: cubic spline (order 3,
    prefiltered), corners from outside the view 0 (mode 'constant'). Returns numpy, dtype kept."""
    maps = maps.detach().cpu().numpy() if torch.is_tensor(maps) else np.asarray(maps)
    # axes (2, 1) on (C, H, W) is the official default axes (1, 0) on its (H, W, C) layout
    return np.stack([ndimage.rotate(view_map, -angle, axes=(2, 1), reshape=False, order=3, mode='constant',
                                    cval=0.0, prefilter=True)
                     for view_map, angle in zip(maps, angles)])


def gaussian_blur(maps, sigma=BLUR_SIGMA):
    """The official blur, scipy.ndimage.gaussian_filter over the last two axes only (sigma 0 elsewhere)
    at its defaults: borders 'reflect' (the edge pixel repeated: d c b a | a b c d), kernel radius
    BLUR_TRUNCATE * sigma."""
    maps = np.asarray(maps)
    sigmas = (0,) * (maps.ndim - 2) + (sigma, sigma)
    return ndimage.gaussian_filter(maps, sigma=sigmas, mode='reflect', truncate=BLUR_TRUNCATE)


def combine_views(maps):
    """(n, C, s, s) rotated-back, blurred gradients -> (s, s) map: mean of |g| over views and channels,
    squared."""
    return np.abs(maps).mean(axis=(0, 1)) ** 2


def gradient_map(model, image_path, config, device):
    """(map (s, s) numpy, score) of one image: the module docstring's formula with n_transforms_test
    views at the fixed angles. Puts `model` in eval mode (dropout off) first."""
    model.eval()
    angles = fixed_angles(config.n_transforms_test)
    dataset = MultiViewDataset([Sample(image_path, 0, '')], config.n_transforms_test, config, fixed_rotations=True,
                               view_seed=config.seed + TEST_VIEW_SEED_OFFSET)  # colour jitter draws as the test views
    views = dataset[0][0].to(device)
    gradients, score = input_gradients(model, views, config.extract_batch_size)
    heat = combine_views(gaussian_blur(rotate_back(gradients, angles)))
    return heat, score


# --- export ----------------------------------------------------------------------------------------

def save_map_png(path, image, heat_map, mask, title):
    """One PNG: the input, the map as a heat overlay (scaled to its own min..max), and the mask if any,
    side by side. `image` (s, s, 3) uint8, `heat_map` (s, s), `mask` (s, s) bool or None."""
    panels = 3 if mask is not None else 2
    figure, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.6), dpi=100)
    span = float(heat_map.max() - heat_map.min())
    normed = (heat_map - heat_map.min()) / span if span > 0 else np.zeros_like(heat_map)
    axes[0].imshow(image)
    axes[0].set_title('input', fontsize=9)
    axes[1].imshow(image)
    axes[1].imshow(normed, cmap='jet', alpha=0.5, vmin=0, vmax=1)
    axes[1].set_title('gradient map', fontsize=9)
    if mask is not None:
        axes[2].imshow(mask, cmap='gray', vmin=0, vmax=1)
        axes[2].set_title('ground truth', fontsize=9)
    for axis in axes:
        axis.axis('off')
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def display_image(image_path, img_size):
    """The image as the network sees it before rotation (resized to img_size), as uint8 (s, s, 3)."""
    resized = transforms.Resize((img_size, img_size))(load_rgb(image_path))
    return np.asarray(resized)


def export_map(model, image_path, defect_type, config, device, png_path, label='', score=None, mask_path=None):
    """Computes the map of one image and writes its PNG (with the ground-truth mask beside it when
    `mask_path` is given); returns (map (s, s), score). The title shows `score` if given (the one a table
    lists), else the score of the map's own pass."""
    heat_map, own_score = gradient_map(model, image_path, config, device)
    score = own_score if score is None else score
    mask = None
    if mask_path is not None:
        mask = np.asarray(Image.fromarray(load_mask(mask_path)).resize((config.img_size, config.img_size),
                                                                        Image.NEAREST))
    title = f'{label or os.path.basename(image_path)} | {defect_type} | score {score:.6g}'
    save_map_png(png_path, display_image(image_path, config.img_size), heat_map, mask, title)
    return heat_map, score


# --- pixel-level metrics (our extension, not in the paper) -------------------------------------------
#
# Streamed: maps and masks go one image at a time, each map upsampled to its mask's resolution and its
# pixels counted into PIXEL_METRIC_BINS score bins, so memory holds one image's pixels and a few
# histograms, whatever the number and size of the masks. Pooling every pixel instead (the *_exact
# functions, kept as the reference) needs several GB on MVTec screw (160 masks of 1024 x 1024).

PIXEL_METRIC_BINS = 16384  # score bins of the streamed metrics; their error bounds shrink as 1 / bins
EDGE_SAMPLE_SIZE = 2_000_000  # at most this many map values (an even stride over all maps) place the bin edges


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


def aupro(maps, masks, max_fpr=AUPRO_MAX_FPR, n_bins=PIXEL_METRIC_BINS):
    """Area under the per-region-overlap curve up to `max_fpr`, divided by `max_fpr` (1 is perfect),
    streamed and binned (see pixel_metrics and aupro_exact)."""
    return pixel_metrics(maps, masks, max_fpr, n_bins)['aupro']


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


def masks_from_sources(mask_sources):
    """The masks of (mask_path or None, (height, width)) pairs, loaded one at a time: None is a
    defect-free image, all zeros."""
    for mask_path, shape in mask_sources:
        yield load_mask(mask_path) if mask_path is not None else np.zeros(shape, dtype=bool)


def localize_class(model, test_samples, config, device, out_dir, log=print):
    """Maps for every test image; a PNG in `out_dir` for each anomalous one; pixel metrics.

    Pixel metrics pool the anomalous images that have a mask and the defect-free test images (their
    mask is all zeros, as in the MVTec AD protocol), per class and per defect type (that type's images
    with the defect-free ones). Maps stay in memory (img_size^2 float32 each); masks are read again
    from disk when a metric needs them. Returns a dict for results.json; metrics are None without any
    mask.
    """
    maps, mask_sources, defect_types = [], [], []
    n_anomalous = n_with_mask = 0
    for path, label, defect_type, mask_path in test_samples:
        if label:
            n_anomalous += 1
            png_name = f'{defect_type}_{os.path.splitext(os.path.basename(path))[0]}.png'
            heat_map, _ = export_map(model, path, defect_type, config, device, os.path.join(out_dir, png_name),
                                     label=os.path.join(defect_type, os.path.basename(path)), mask_path=mask_path)
            if mask_path is None:  # no ground truth: the PNG is all we can give
                continue
            n_with_mask += 1
            mask_sources.append((mask_path, None))
        else:
            heat_map, _ = gradient_map(model, path, config, device)
            with Image.open(path) as image:  # reads the header only
                mask_sources.append((None, image.size[::-1]))
        maps.append(heat_map)
        defect_types.append(defect_type if label else None)
    log(f'gradient maps: {n_anomalous} PNGs in {out_dir}; {n_with_mask} anomalous images have a mask')
    result = {'maps_dir': out_dir, 'n_pixel_metric_images': len(maps), 'pixel_auroc': None,
              'pixel_auroc_per_defect_type': {}, 'aupro': None}
    if n_with_mask == 0:
        return result
    metrics = pixel_metrics(maps, masks_from_sources(mask_sources))
    result['pixel_auroc'], result['aupro'] = metrics['pixel_auroc'], metrics['aupro']
    for defect_type in sorted(set(defect_types) - {None}):
        picked = [i for i, d in enumerate(defect_types) if d in (defect_type, None)]
        result['pixel_auroc_per_defect_type'][defect_type] = pixel_auroc(
            [maps[i] for i in picked], masks_from_sources(mask_sources[i] for i in picked))
    per_type = ', '.join(f'{k} {v:.4f}' for k, v in result['pixel_auroc_per_defect_type'].items())
    log(f"pixel AUROC (ours, not in the paper): {result['pixel_auroc']:.4f} ({per_type}); "
        f"AUPRO@{AUPRO_MAX_FPR}: {result['aupro']:.4f} (binned: within {metrics['pixel_auroc_max_error']:.1e} "
        f"and {metrics['aupro_max_error']:.1e} of the exact values)")
    return result


def map_file_name(image_path, common_root):
    """A flat PNG name for an image: its path below `common_root` with separators as '__'."""
    relative = os.path.relpath(os.path.abspath(image_path), common_root)
    return os.path.splitext(relative)[0].replace(os.sep, '__') + '_map.png'

