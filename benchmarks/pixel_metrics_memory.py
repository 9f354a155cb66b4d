"""Memory and time of the pixel metrics for a class the size of MVTec AD screw: 160 test images, maps at
the resolution the code produces (img_size 448), masks of 1024 x 1024 (a quarter of them empty, as the
defect-free test images).

    python benchmarks/pixel_metrics_memory.py                 # streamed, binned (what the code runs)
    python benchmarks/pixel_metrics_memory.py --mode both     # and the previous exact pooling, for comparison

Each mode runs in its own process. Peak memory is measured two ways from the point where the maps are
already in memory (they are kept by localize_class anyway: 160 x 448^2 float32 = 128 MB): tracemalloc's
peak (numpy's allocations; torch's upsampling buffers are not traced) and the growth of the process's
peak resident set (ru_maxrss). Masks are made one at a time in the streamed mode (as localize_class reads
them from disk) and all kept for the exact one (it needs them twice). Prints figures; asserts nothing.

What it printed, and where: docs/faithfulness.md (pixel AUROC and AUPRO).
"""
import argparse
import os
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from base.exact_metrics import aupro_exact, pixel_auroc_exact  # noqa: E402

from base.metrics import pixel_metrics  # noqa: E402


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synthetic_mask(index, size):
    """Deterministic blobs (1 to 3 discs) in three images of four; the fourth is defect-free."""
    mask = np.zeros((size, size), dtype=bool)
    if index % 4 == 0:
        return mask
    rng = np.random.RandomState(index)
    rows, cols = np.ogrid[:size, :size]
    margin, largest = min(50, size // 4), min(60, size // 4)  # MVTec-sized masks: 50 and 60 px; small ones scale
    for _ in range(rng.randint(1, 4)):
        row, col = rng.randint(margin, size - margin), rng.randint(margin, size - margin)
        radius = rng.randint(min(5, largest - 1), largest)
        mask |= (rows - row) ** 2 + (cols - col) ** 2 <= radius ** 2
    return mask


def synthetic_maps(n_images, map_size, mask_size, seed=0):
    """Maps brighter where their mask has blobs, on scales that differ by orders of magnitude from image
    to image (as gradient maps do)."""
    rng = np.random.RandomState(seed)
    maps = []
    for index in range(n_images):
        mask = synthetic_mask(index, mask_size)
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((map_size, map_size), Image.BILINEAR)) / 255
        noise = rng.lognormal(0.0, 1.0, (map_size, map_size))
        maps.append(((noise + 8.0 * small) * 10.0 ** rng.uniform(-0.5, 0.5)).astype(np.float32))
    return maps


def measure(mode, n_images, map_size, mask_size):
    maps = synthetic_maps(n_images, map_size, mask_size)
    rss_before = peak_rss_mib()
    tracemalloc.start()
    start = time.perf_counter()
    if mode == 'binned':
        metrics = pixel_metrics(maps, (synthetic_mask(i, mask_size) for i in range(n_images)))
        figures = (f"pixel AUROC {metrics['pixel_auroc']:.6f} (+-{metrics['pixel_auroc_max_error']:.1e}), "
                   f"AUPRO {metrics['aupro']:.6f} (+-{metrics['aupro_max_error']:.1e})")
    else:
        masks = [synthetic_mask(i, mask_size) for i in range(n_images)]
        figures = f'pixel AUROC {pixel_auroc_exact(maps, masks):.6f}, AUPRO {aupro_exact(maps, masks):.6f}'
    seconds = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f'{mode}: {n_images} maps of {map_size}^2, masks of {mask_size}^2: {figures}; {seconds:.1f} s; '
          f'peak traced {traced_peak / 2 ** 20:.0f} MiB, peak resident +{peak_rss_mib() - rss_before:.0f} MiB '
          f'(process peak {peak_rss_mib():.0f} MiB)', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mode', choices=['binned', 'exact', 'both'], default='binned')
    parser.add_argument('--n_images', type=int, default=160)
    parser.add_argument('--map_size', type=int, default=448)
    parser.add_argument('--mask_size', type=int, default=1024)
    args = parser.parse_args()
    if args.mode == 'both':
        for mode in ['binned', 'exact']:
            subprocess.run([sys.executable, os.path.abspath(__file__), '--mode', mode, '--n_images', str(args.n_images),
                            '--map_size', str(args.map_size), '--mask_size', str(args.mask_size)], check=True)
        return
    measure(args.mode, args.n_images, args.map_size, args.mask_size)


if __name__ == '__main__':
    main()
