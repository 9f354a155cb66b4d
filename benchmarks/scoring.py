"""Scoring speed and what fewer or random test views cost: prints one figure per line, asserts nothing.

    python benchmarks/scoring.py --checkpoint results/RUN/bottle_checkpoint.pt \
        --dataset_path ../shared/data/mvtec --class_name bottle [--onnx bottle.onnx]

For the class's test images: images/s of scoring.Scorer (checkpoint loaded once, views batched) at 64 and
at 16 fixed-angle views; image AUROC at 64 and 16 fixed angles (what --score and the checkpoint use) and at
64 random angles drawn from the seed (what training's evaluation uses); with --onnx, images/s of the
exported model in onnxruntime against PyTorch on the same views.
"""
import argparse
import os
import sys
import time
import types

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from model import TEST_VIEW_SEED_OFFSET, seeded_view_features  # noqa: E402
from base.metrics import auroc_or_nan  # noqa: E402
from deployment.scoring import Scorer  # noqa: E402
from model import score_view_features  # noqa: E402
from base.settings import build_config  # noqa: E402
from utils import MultiViewDataset
from image_data.image_files import Sample
from image_data.layouts import find_class_samples


def with_views(scorer, n_views):
    """The scorer with its settings at `n_views` test views (the checkpoint fixes 64)."""
    scorer.settings = types.SimpleNamespace(**{**vars(scorer.settings), 'n_transforms_test': n_views})
    return scorer


def timed_scores(scorer, paths):
    started = time.perf_counter()
    results = scorer.score(paths)
    return np.array([result.raw for result in results]), time.perf_counter() - started


def random_view_scores(scorer, samples):
    """Scores at random angles drawn from the test-view seed, as a run's cached test views."""
    settings = scorer.settings
    features, _ = seeded_view_features(scorer.model, samples, settings.n_transforms_test,
                                      settings.seed + TEST_VIEW_SEED_OFFSET, settings, scorer.device, 'random views')
    return score_view_features(scorer.model, features, settings.batch_size_test)[0]


def onnx_speed(scorer, onnx_path, paths, n_images):
    """(images/s in onnxruntime, images/s of the same views through PyTorch) at the scorer's views."""
    import onnxruntime
    session = onnxruntime.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
    dataset = MultiViewDataset([Sample(path, -1, '') for path in paths[:n_images]], scorer.settings.n_transforms_test,
                               scorer.settings, fixed_rotations=True)
    views = [dataset.views_of(i, torch.device('cpu')) for i in range(len(dataset))]
    started = time.perf_counter()
    for image_views in views:
        session.run(None, {'views': image_views.numpy()})
    onnx_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with torch.no_grad():
        for image_views in views:
            for chunk in image_views.split(scorer.settings.extract_batch_size):
                scorer.model(chunk.contiguous(memory_format=torch.channels_last))
    return len(views) / onnx_seconds, len(views) / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', required=True)
    parser.add_argument('--dataset_path', default=os.path.join(REPO_ROOT, '..', 'shared', 'data', 'mvtec'))
    parser.add_argument('--class_name', default='bottle')
    parser.add_argument('--onnx', default='', help='an export of the checkpoint (python main.py --export)')
    parser.add_argument('--onnx_images', type=int, default=10)
    args = parser.parse_args()
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads', flush=True)
    _, test = find_class_samples(args.dataset_path, args.class_name)
    paths, labels = [sample.path for sample in test], [sample.label for sample in test]
    started = time.perf_counter()
    scorer = Scorer(args.checkpoint, build_config(feature_cache=False))
    print(f'checkpoint loaded in {time.perf_counter() - started:.1f} s', flush=True)
    for n_views in (64, 16):
        scores, seconds = timed_scores(with_views(scorer, n_views), paths)
        print(f'{args.class_name}: {n_views} fixed-angle views: {len(paths) / seconds:.2f} images/s '
              f'({len(paths)} images in {seconds:.1f} s), image AUROC {auroc_or_nan(labels, scores):.4f}', flush=True)
    random_scores = random_view_scores(with_views(scorer, 64), test)
    print(f'{args.class_name}: 64 random-angle views (seeded, as training evaluates): image AUROC '
          f'{auroc_or_nan(labels, random_scores):.4f}', flush=True)
    if args.onnx:
        onnx, pytorch = onnx_speed(with_views(scorer, 64), args.onnx, paths, args.onnx_images)
        print(f'64 views per image: onnxruntime {onnx:.2f} images/s, PyTorch {pytorch:.2f} images/s '
              f'({os.path.getsize(args.onnx) / 1e6:.0f} MB model)', flush=True)


if __name__ == '__main__':
    main()
