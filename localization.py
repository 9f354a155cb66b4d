"""Where the defect is: DifferNet's gradient maps, their export as PNGs, and pixel-level metrics.

Gradient map of one image x (paper Sec. 3.4; the official `export_gradient_maps`):

    x_i   = T_i(x), i = 0..n-1       views rotated by a_i = i * 360 / n degrees (n = n_transforms_test)
    L     = nll_loss(f(x_0), ..., f(x_{n-1}))   the training loss of the n views together
    g_i   = dL / dx_i                 (3, s, s), the gradient of that loss w.r.t. the input pixels
    g'_i  = G_3 * T_i^-1(g_i)         rotated back by -a_i, then Gaussian-blurred (sigma 3) per channel
    map   = (mean over views i and channels c of |g'_i,c|) ** 2          (s, s)

Rotation back and blur are the official scipy.ndimage calls with the official arguments: rotate
(cubic spline, reshape=False, zeros outside) and gaussian_filter (sigma 3, 'reflect' borders, radius
4 sigma), on CPU numpy (docs/faithfulness.md).

Pixels that raise the loss most (the least likely under the flow) light up. The AlexNet weights are
frozen, but the gradient still flows through them to the input, so nothing here runs under no_grad.

Pixel-level AUROC and AUPRO of these maps against the ground-truth masks (metrics.py) are OUR extension:
the paper reports neither (it shows maps qualitatively only).
"""
import logging
import os

import matplotlib
import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torchvision import transforms

from base.atomic_files import replace_atomically
from base.file_names import map_png_name
from base.metrics import AUPRO_MAX_FPR, pixel_auroc, pixel_metrics
from base.settings import settings_group
from freia_funcs import nll_loss
from image_data.image_files import Sample, load_mask, load_rgb
from model import TEST_VIEW_SEED_OFFSET, view_scores
from utils import MultiViewDataset, fixed_angles

matplotlib.use('Agg')  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

logger = logging.getLogger(__name__)

BLUR_SIGMA = 3.0  # paper and official code
BLUR_TRUNCATE = 4.0  # kernel radius in sigmas, scipy.ndimage.gaussian_filter's default (official blur)


def input_gradients(model, views, chunk_size=None):
    """(dL/dviews (n, 3, s, s), score): L = nll_loss of the views through `model` under its precision, the
    score the mean of the views' `model.view_scores` (the image's anomaly score from the same pass).

    L is a mean over views of terms that each depend on one view only, so the views can go through in
    chunks of `chunk_size` (memory: AlexNet's activations are kept for the backward pass); each chunk's
    gradient is scaled by its share of the views, which gives the full pass's gradient.
    """
    chunk_size = chunk_size or len(views)
    gradients, scores = [], []
    for chunk in views.split(chunk_size):
        chunk = model.in_memory_format(chunk.detach().clone()).requires_grad_(True)
        with model.autocast():
            z, log_jac_det = model.nf(model.features(chunk).float())
        z, log_jac_det = z.float(), log_jac_det.float()
        loss = nll_loss(z, log_jac_det) * (len(chunk) / len(views))
        # autograd.grad, not backward: the flow's own .grad fields stay untouched
        gradient, = torch.autograd.grad(loss, chunk)
        gradients.append(gradient.float())
        scores.append(view_scores(z.detach().double()))
    return torch.cat(gradients), float(torch.cat(scores).mean())


def rotate_back(maps, angles):
    """Undoes the view rotations: maps[i] (C, s, s), taken on the image rotated by angles[i] degrees
    (counter-clockwise, about the centre, as the views of `utils.MultiViewDataset`), rotated by -angles[i] with the
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


def gradient_map(model, image_path, config, device, image=None):
    """(map (s, s) numpy, score) of one image (its file, or `image`, an RGB PIL image in memory): the module
    docstring's formula with n_transforms_test views at the fixed angles. Puts `model` in eval mode (dropout
    off) first."""
    model.eval()
    gradients, score = view_gradients(model, image_path, config, device, image)
    heat = combine_views(gaussian_blur(rotate_back(gradients, fixed_angles(config.n_transforms_test))))
    return heat, score


def view_gradients(model, image_path, config, device, image=None):
    """(dL/dviews (n_transforms_test, 3, s, s), score) of one image (its file, or `image` in memory) at the
    fixed angles, the views as the test views make them: the input of `gradient_map`'s operations."""
    dataset = MultiViewDataset([Sample(image_path, 0, '')], config.n_transforms_test, settings_group(config, 'views'), fixed_rotations=True,
                               view_seed=config.seed + TEST_VIEW_SEED_OFFSET,  # colour jitter draws as the test views
                               images=None if image is None else [image])
    return input_gradients(model, dataset.views_of(0, device), model.views_per_pass)


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
    try:  # whole or not at all: --resume after a failure writes it again
        replace_atomically(path, lambda part: figure.savefig(part, format='png'))
    finally:
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


def masks_from_sources(mask_sources):
    """The masks of (mask_path or None, (height, width)) pairs, loaded one at a time: None is a
    defect-free image, all zeros."""
    for mask_path, shape in mask_sources:
        yield load_mask(mask_path) if mask_path is not None else np.zeros(shape, dtype=bool)


def localize_class(model, test_samples, config, device, out_dir):
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
            png_name = map_png_name(defect_type, path)
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
    logger.info(f'gradient maps: {n_anomalous} PNGs in {out_dir}; {n_with_mask} anomalous images have a mask')
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
    logger.info(f"pixel AUROC (ours, not in the paper): {result['pixel_auroc']:.4f} ({per_type}); "
        f"AUPRO@{AUPRO_MAX_FPR}: {result['aupro']:.4f} (binned: within {metrics['pixel_auroc_max_error']:.1e} "
        f"and {metrics['aupro_max_error']:.1e} of the exact values)")
    return result
