"""What following the official map operations changed: the gradient maps of one trained model with the
previous operations (torchvision bilinear rotation back, blur with scipy-'mirror' borders) and with the
official ones (scipy.ndimage.rotate cubic spline, gaussian_filter with 'reflect' borders), from the
same input gradients; pixel AUROC and AUPRO both ways (exact and binned), and how far the maps differ.

    python main.py --dataset_path ../shared/data/mvtec --class_name bottle --meta_epochs 1 --sub_epochs 4 \\
        --train_feature_pool 8 --n_transforms_test 16 --val_fraction 0.1 --bf16_autocast true \\
        --results_dir /tmp/locmaps/bottle_run
    python benchmarks/gradient_map_ops.py --checkpoint /tmp/locmaps/bottle_run/bottle_checkpoint.pt

Prints figures only. Map differences are of maps scaled to their own min..max (as the PNGs show them).

What it printed on bottle, and the command: docs/faithfulness.md (pixel AUROC and AUPRO).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from localization import BLUR_SIGMA, BLUR_TRUNCATE, combine_views, gaussian_blur, rotate_back, view_gradients  # noqa: E402
from base.metrics import pixel_metrics  # noqa: E402
from model import load_checkpoint  # noqa: E402
from deployment.scoring import scoring_settings  # noqa: E402
from base.settings import build_config  # noqa: E402
from base.exact_metrics import aupro_exact, pixel_auroc_exact  # noqa: E402
from image_data.layouts import find_class_samples
from utils import fixed_angles
from image_data.image_files import load_mask


def previous_map(gradients, angles):
    """The operations this repository used before: bilinear rotation back, torchvision's blur (its
    'reflect' padding is scipy's 'mirror')."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    turned = torch.stack([TF.rotate(g, -a, interpolation=InterpolationMode.BILINEAR) for g, a in zip(gradients, angles)])
    radius = int(BLUR_TRUNCATE * BLUR_SIGMA + 0.5)
    blurred = TF.gaussian_blur(turned, kernel_size=2 * radius + 1, sigma=BLUR_SIGMA)
    return (blurred.abs().mean(dim=(0, 1)) ** 2).numpy()


def normed(heat_map):
    span = float(heat_map.max() - heat_map.min())
    return (heat_map - heat_map.min()) / span if span > 0 else np.zeros_like(heat_map)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', required=True)
    parser.add_argument('--dataset_path', default=os.path.join(REPO_ROOT, '..', 'shared', 'data', 'mvtec'))
    parser.add_argument('--class_name', default='bottle')
    parser.add_argument('--n_transforms_test', type=int, default=0, help="views per map (0: the checkpoint's)")
    parser.add_argument('--stride', type=int, default=1, help='every k-th test image only (CPU time)')
    parser.add_argument('--save_maps', default='', help='npz file to keep both sets of maps in')
    return parser.parse_args()


def mask_of(path, label, mask_path):
    """The ground-truth mask of a test image; all False for a defect-free one."""
    if label and mask_path is None:
        raise SystemExit(f'{path} has no mask')
    if label:
        return load_mask(mask_path)
    with Image.open(path) as image:
        return np.zeros(image.size[::-1], dtype=bool)


def maps_both_ways(model, settings, test_samples):
    """(previous maps, official maps, masks, seconds {gradients, previous, official}) of `test_samples`,
    both sets of maps from the same input gradients."""
    angles = fixed_angles(settings.n_transforms_test)
    old_maps, new_maps, masks = [], [], []
    seconds = {'gradients': 0.0, 'previous': 0.0, 'official': 0.0}
    for index, (path, label, defect_type, mask_path) in enumerate(test_samples):
        start = time.perf_counter()
        gradients, _ = view_gradients(model, path, settings, torch.device('cpu'))
        seconds['gradients'] += time.perf_counter() - start
        start = time.perf_counter()
        old_maps.append(previous_map(gradients, angles))
        seconds['previous'] += time.perf_counter() - start
        start = time.perf_counter()
        new_maps.append(combine_views(gaussian_blur(rotate_back(gradients, angles))))
        seconds['official'] += time.perf_counter() - start
        masks.append(mask_of(path, label, mask_path))
        print(f'{index + 1}/{len(test_samples)} {defect_type}', end='\r', flush=True)
    print()
    return old_maps, new_maps, masks, seconds


def print_comparison(old_maps, new_maps, masks):
    """How far the two sets of maps differ, and their pixel AUROC / AUPRO, exact and binned."""
    differences = np.array([np.abs(normed(a) - normed(b)).max() for a, b in zip(old_maps, new_maps)])
    mean_differences = np.array([np.abs(normed(a) - normed(b)).mean() for a, b in zip(old_maps, new_maps)])
    relative = np.array([np.abs(a - b).max() / b.max() for a, b in zip(old_maps, new_maps)])
    print(f'normalized maps (own min..max), |previous - official|: max {differences.max():.4f}, '
          f'median of per-image max {np.median(differences):.4f}, mean {mean_differences.mean():.5f}')
    print(f'raw maps: max |previous - official| / max official per image: max {relative.max():.4f}, '
          f'median {np.median(relative):.4f}')
    print('| operations | pixel AUROC exact | binned | bound | AUPRO@0.3 exact | binned | bound |')
    print('|---|---|---|---|---|---|---|')
    for name, maps in [('previous', old_maps), ('official', new_maps)]:
        binned = pixel_metrics(maps, iter(masks))
        values = (pixel_auroc_exact(maps, masks), binned['pixel_auroc'], binned['pixel_auroc_max_error'],
                  aupro_exact(maps, masks), binned['aupro'], binned['aupro_max_error'])
        print(f'| {name} | ' + ' | '.join(f'{v:.6f}' if i % 3 != 2 else f'{v:.1e}' for i, v in enumerate(values)) + ' |')


def main():
    args = parse_args()
    torch.set_grad_enabled(True)
    model, checkpoint = load_checkpoint(args.checkpoint, build_config(device='cpu'))
    settings = scoring_settings(checkpoint['settings'], build_config(device='cpu'))
    if args.n_transforms_test:
        settings.n_transforms_test = args.n_transforms_test
    model.prepare(settings, torch.device('cpu')).eval()
    _, test_samples = find_class_samples(args.dataset_path, args.class_name)
    test_samples = test_samples[::args.stride]
    old_maps, new_maps, masks, seconds = maps_both_ways(model, settings, test_samples)
    if args.save_maps:
        np.savez_compressed(args.save_maps, old=np.stack(old_maps), new=np.stack(new_maps))
    n = len(test_samples)
    print(f'{args.class_name}: {n} test images, {settings.n_transforms_test} views, maps {new_maps[0].shape}')
    print(f"seconds per image: gradients {seconds['gradients'] / n:.2f}, previous operations "
          f"{seconds['previous'] / n:.3f}, official operations {seconds['official'] / n:.3f}")
    print_comparison(old_maps, new_maps, masks)


if __name__ == '__main__':
    main()
