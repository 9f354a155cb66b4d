"""Views per second of the two view backends on a real class, without AlexNet: prints figures only.

    python benchmarks/views.py                                  # bottle, CPU, training and test views
    python benchmarks/views.py --device cuda                    # the same on a GPU

Each backend makes the views of every training image (4 each, 24 images per batch, as a training sub
epoch) and of test images (64 each, one image per batch as the test-view extraction on a CPU) from the
kept resized images (the first pass, which decodes and resizes, is not timed), and puts them on the
device. 'pil': RandomRotation, ToTensor, Normalize per view on PIL images (the official pipeline);
'tensor': the same views in batches with tensor operations (utils.MultiViewDataset, backend 'tensor').
"""
import argparse
import os
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from utils import dataset_loader  # noqa: E402
from base.settings import build_config  # noqa: E402
from utils import MultiViewDataset
from image_data.layouts import find_class_samples


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def views_per_second(samples, n_views, images_per_batch, backend, config, device, repeats):
    dataset = MultiViewDataset(samples, n_views, config, keep_images=True, backend=backend)
    loader = dataset_loader(dataset, images_per_batch, True, config, device)

    def one_pass():
        for batch, _ in loader:
            dataset.batch_views(batch, device)
        synchronize(device)

    one_pass()  # decodes and resizes (both backends keep the resized images), warms up kernels
    start = time.perf_counter()
    for _ in range(repeats):
        one_pass()
    seconds = (time.perf_counter() - start) / repeats
    return len(samples) * n_views / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset_path', default=os.path.join(REPO_ROOT, '..', 'shared', 'data', 'mvtec'))
    parser.add_argument('--class_name', default='bottle')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--test_images', type=int, default=16, help='test images timed (64 views each)')
    args = parser.parse_args()
    device = torch.device(args.device)
    config = build_config()
    train, test = find_class_samples(args.dataset_path, args.class_name)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {args.class_name}, '
          f'{config.img_size} px', flush=True)
    cases = [('training views', train, config.n_transforms, config.batch_size),
             ('test views', test[:args.test_images], config.n_transforms_test, 1)]
    for label, samples, n_views, images_per_batch in cases:
        for backend in ('pil', 'tensor'):
            rate = views_per_second(samples, n_views, images_per_batch, backend, config, device, args.repeats)
            print(f'{label:15s} {backend:6s} {rate:8.1f} views/s  ({len(samples)} images x {n_views} views, '
                  f'{images_per_batch} image(s) per batch)', flush=True)


if __name__ == '__main__':
    main()
