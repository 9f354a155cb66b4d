"""Scoring new images with a trained checkpoint: the `--score` command, the threshold and the score
statistics of defect-free images it comes from, and the scores CSV.
"""
import csv
import io
import math
import os
import types

import numpy as np

from atomic_files import write_text_atomic
from errors import UserError
from features import TEST_VIEW_SEED_OFFSET, fixed_view_features, prepare_extractor
from hardware import resolve_device
from localization import export_map, map_file_name
from model import load_checkpoint
from settings import validate_threshold_fpr
from train import score_features
from utils import Sample, image_extensions, image_problems, is_image_name

SCORE_QUANTILES = (0.5, 0.9, 0.95, 0.99, 1.0)


def score_statistics(scores, files):
    """What a checkpoint keeps of the scores of defect-free images: n, mean, std, quantiles, and the raw
    scores with their files (a threshold for any false-positive rate can be set from them later)."""
    scores = np.asarray(scores, dtype=np.float64)
    return {'n': int(len(scores)), 'mean': float(scores.mean()), 'std': float(scores.std()),
            'quantiles': {str(q): float(np.quantile(scores, q)) for q in SCORE_QUANTILES},
            'scores': [float(s) for s in scores], 'files': list(files)}


def threshold_at_fpr(scores, fpr):
    """The smallest of `scores` that at most floor(fpr * n) of them exceed: with `score > threshold`
    as the decision, the share of these images called anomalous is at most `fpr`."""
    ranked = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    allowed = int(math.floor(fpr * len(ranked) + 1e-9))
    return float(ranked[min(allowed, len(ranked) - 1)])


def decision_threshold(reference_scores, fpr, explicit=None, checkpoint_path=''):
    """(threshold, one line saying where it comes from)."""
    if explicit is not None:
        return float(explicit), 'given with --threshold'
    for name, what in (('validation', 'held-out defect-free validation images'),
                       ('training', "training images' own scores (optimistic: the flow was fitted to them; "
                                    'train with --val_fraction 0.1 for a held-out threshold)')):
        stats = (reference_scores or {}).get(name)
        if stats:
            threshold = threshold_at_fpr(stats['scores'], fpr)
            return threshold, f"score at false-positive rate {fpr:g} on the {stats['n']} {what}"
    raise UserError(f'checkpoint {checkpoint_path} holds no scores of defect-free images (an official '
                    f'checkpoint); give a threshold with --threshold X')


def collect_images(paths):
    """Image files of `paths`, each a file or a folder (searched recursively, sorted); raises UserError
    for a missing path or when no image is found."""
    extensions = image_extensions()
    found = []
    for path in paths:
        if os.path.isfile(path):
            found.append(path)
        elif os.path.isdir(path):
            for folder, subfolders, names in os.walk(path):
                subfolders[:] = sorted(d for d in subfolders if not d.startswith('.'))
                found += [os.path.join(folder, name) for name in sorted(names) if is_image_name(name, extensions)]
        else:
            raise UserError(f'--score: {path} does not exist; give image files or folders of images')
    if not found:
        raise UserError(f"--score: no images found in {', '.join(paths)} (extensions Pillow reads: .png, .jpg, ...)")
    return found


def write_scores_csv(path, rows):
    """CSV with a header `file,score,decision`, one row per image, written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = io.StringIO(newline='')
    writer = csv.writer(text)
    writer.writerow(['file', 'score', 'decision'])
    for file, score, decision in rows:
        writer.writerow([file, f'{score:.9g}', decision])  # 9 digits: a float32 exactly
    write_text_atomic(path, text.getvalue())


def prepare_model(model, settings, device):
    """The model as training left it for scoring: on `device`, extractor memory format as the run's
    (channels_last changes float rounding), the flow's kernel as cpu_flow_kernel says ('auto': PyTorch's
    own, a scoring run measures nothing), eval mode."""
    model.to(device).use_flow_kernel(settings.cpu_flow_kernel)
    prepare_extractor(model, settings)
    return model.eval()


def reference_view_features(model, samples, settings, device, description, log=print):
    """Features (N, n_views, D) of `samples` at the fixed rotations, with the view seed of the test views
    (it matters only with colour jitter on), so that scores match a run with fixed_test_rotations."""
    features, _ = fixed_view_features(model, samples, settings.n_transforms_test,
                                      settings.seed + TEST_VIEW_SEED_OFFSET, settings, device, description,
                                      log, fixed_rotations=True)
    return features


def scores_of_features(model, features, settings):
    """Anomaly score of each image (N,) from its view features (N, n_views, D); model in eval mode."""
    model.eval()
    return score_features(model, features, settings)[0]


def scoring_settings(checkpoint_settings, config):
    """What scoring runs with: `config` (device, workers, threshold_fpr, ...) with every value the
    checkpoint fixes on top, and no disk feature cache (scored images are one-offs)."""
    values = dict(vars(config))
    values.update(checkpoint_settings)
    values['feature_cache'] = False
    return types.SimpleNamespace(**values)


def score_images(config, paths, checkpoint_path, threshold=None, score_out='scores.csv', maps_dir='',
                 log=print):
    """The `--score` command: scores the images of `paths` with the checkpoint, decides with the
    threshold, prints a table, writes the CSV (and a gradient-map PNG per image into `maps_dir`).
    Returns the rows (file, score, decision)."""
    image_paths = collect_images(paths)
    problems = image_problems(image_paths)
    if problems:
        raise UserError('; '.join(f'cannot read image {path} ({reason})' for path, reason in problems)
                        + '; replace or remove it')
    model, checkpoint = load_checkpoint(checkpoint_path, config)
    settings = scoring_settings(checkpoint['settings'], config)
    threshold, origin = decision_threshold(checkpoint['reference_scores'], config.threshold_fpr, threshold,
                                           checkpoint_path)
    device = resolve_device(config.device)
    prepare_model(model, settings, device)
    log(f"Checkpoint {checkpoint_path} ({checkpoint['class_name'] or 'official'}; "
        f"{checkpoint['extractor']['source']}; {settings.n_transforms_test} views at fixed rotations)")
    log(f'Threshold {threshold:.6g}: {origin}')
    samples = [Sample(path, -1, '') for path in image_paths]
    features = reference_view_features(model, samples, settings, device, 'scored images', log)
    scores = scores_of_features(model, features, settings)
    rows = [(path, float(score), 'anomalous' if score > threshold else 'good')
            for path, score in zip(image_paths, scores)]
    width = max(len(path) for path in image_paths)
    log(f"{'file':<{width}}  {'score':>12}  decision")
    for path, score, decision in rows:
        log(f'{path:<{width}}  {score:>12.6g}  {decision}')
    write_scores_csv(score_out, rows)
    n_anomalous = sum(decision == 'anomalous' for _, _, decision in rows)
    log(f'{len(rows)} images, {n_anomalous} anomalous; wrote {score_out}')
    if maps_dir:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in image_paths])
        for path, score, _ in rows:
            export_map(model, path, os.path.basename(os.path.dirname(os.path.abspath(path))), settings, device,
                       os.path.join(maps_dir, map_file_name(path, root)), score=score)
        log(f'gradient maps: {len(rows)} PNGs in {maps_dir}')
    return rows


def score_command(config, args):
    """The --score command, after checking its options go together."""
    if not args.score or not args.checkpoint:
        raise UserError('--score PATH... and --checkpoint FILE go together, e.g. '
                        '--score data/new_parts --checkpoint results/RUN/bottle_checkpoint.pt')
    validate_threshold_fpr(config)
    score_images(config, args.score, args.checkpoint, threshold=args.threshold, score_out=args.score_out,
                 maps_dir=args.maps, log=lambda line: print(line, flush=True))
