"""Scoring new images with a trained checkpoint: `Scorer` (from Python), the `--score` command, and the scores
CSV. The threshold and the 0..1 scale come from base/thresholds.py, the score itself from model.py.
"""
import csv
import io
import logging
import os
import time
import types
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image

from base.atomic_files import write_text_atomic
from base.errors import UserError
from base.file_names import map_file_name
from base.hardware import resolve_device
from base.settings import build_config, config_defaults, same_value, settings_group, validate_threshold_fpr
from base.thresholds import decision_threshold, normalized_scores, score_normalization
from image_data.image_files import Sample, image_extensions, image_problems, is_image_name, to_rgb
from localization import export_map, gradient_map
from model import fixed_rotation_features, load_checkpoint, score_view_features

logger = logging.getLogger(__name__)



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


def write_scores_csv(path, results):
    """CSV with a header `file,raw_score,score,decision` (score: the 0..1 form), one row per ImageScore,
    written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = io.StringIO(newline='')
    writer = csv.writer(text)
    writer.writerow(['file', 'raw_score', 'score', 'decision'])
    for result in results:  # 9 digits: a float32 exactly
        writer.writerow([result.name, f'{result.raw:.9g}', f'{result.score:.6f}',
                         'anomalous' if result.anomalous else 'good'])
    write_text_atomic(path, text.getvalue())


def scoring_settings(checkpoint_settings, config):
    """What scoring runs with: `config` (device, workers, threshold_fpr, ...) with every value the
    checkpoint fixes on top, and no disk feature cache (scored images are one-offs)."""
    values = dict(vars(config))
    values.update(checkpoint_settings)
    values['feature_cache'] = False
    return types.SimpleNamespace(**values)


def overruled_settings(checkpoint_settings, config):
    """{name: (asked, used)} of the settings `config` changes from config.py's values that the checkpoint
    fixes otherwise: scoring uses the checkpoint's, as its threshold and reference scores were made with
    them, and says so instead of dropping the request silently."""
    defaults = config_defaults()
    overruled = {}
    for name, used in checkpoint_settings.items():
        asked = getattr(config, name, used)
        changed = name in defaults and not same_value(asked, defaults[name])
        if changed and not same_value(asked, used):
            overruled[name] = (asked, used)
    return overruled


class ImageScore(NamedTuple):
    """The score of one image: `raw` (the mean z^2 over its views), `score` (raw on 0..1, the threshold at
    0.5: `normalized_scores`), the decision, and its gradient map (s, s) when asked for."""
    name: str
    raw: float
    score: float
    anomalous: bool
    gradient_map: Optional[np.ndarray] = None


def as_rgb_image(image):
    """An RGB PIL image from a PIL image or a uint8 array (h, w), (h, w, 3) or (h, w, 4)."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise UserError(f'an image array must be uint8 (h, w), (h, w, 3) or (h, w, 4), got {array.dtype} '
                        f'{tuple(array.shape)}; convert it with numpy.asarray(image, dtype=numpy.uint8)')
    return to_rgb(Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array))


class Scorer:
    """A trained DifferNet, loaded once, that scores images: files, PIL images or uint8 arrays.

        scorer = Scorer('results/RUN/bottle_checkpoint.pt')
        for result in scorer.score(['part_001.png', pil_image, uint8_array]):
            print(result.name, result.raw, result.score, result.anomalous)

    `config` gives the device, threshold_fpr and the like (config.py's values by default); the checkpoint
    fixes everything that shapes a score. `threshold` overrides the one from the checkpoint's defect-free
    reference scores.
    """

    def __init__(self, checkpoint_path, config=None, threshold=None):
        config = config or build_config()
        validate_threshold_fpr(config)
        self.checkpoint_path = checkpoint_path
        self.model, self.checkpoint = load_checkpoint(checkpoint_path, config)
        self.settings = scoring_settings(self.checkpoint['settings'], config)
        overruled = overruled_settings(self.checkpoint['settings'], config)
        if overruled:
            fixed = ', '.join(f'{name} {used!r} (asked: {asked!r})' for name, (asked, used) in overruled.items())
            logger.info(f'the checkpoint fixes {fixed}: its threshold and reference scores were made with these, so '
                'they are used')
        self.threshold, self.threshold_origin = decision_threshold(
            self.checkpoint['reference_scores'], config.threshold_fpr, threshold, checkpoint_path)
        self.normalization = score_normalization(self.checkpoint['reference_scores'], self.threshold)
        self.device = resolve_device(config.device)
        # as training left it: extractor memory format as the run's (channels_last changes float rounding),
        # its precision; the flow's kernel as cpu_flow_kernel says ('auto': PyTorch's own: scoring measures nothing)
        self.model.prepare(settings_group(self.settings, 'numerics'), self.device).eval()

    def raw_scores(self, images, names):
        """The mean z^2 of each image (an RGB PIL image, or None: the file `name`), its n_transforms_test
        views at the fixed rotations batched through AlexNet and the flow."""
        samples = [Sample(name, -1, '') for name in names]
        features = fixed_rotation_features(self.model, samples, self.settings, self.device, 'scored images',
                                           images=images)
        return score_view_features(self.model, features, self.settings.batch_size_test)[0]

    def score(self, images, maps=False):
        """[ImageScore] of `images` (paths, PIL images or uint8 arrays), in order; with `maps` each with its
        gradient map."""
        is_file = [isinstance(image, (str, os.PathLike)) for image in images]
        names = [str(image) if file else f'<image {i}>' for i, (image, file) in enumerate(zip(images, is_file))]
        for name, file in zip(names, is_file):
            if file and not os.path.isfile(name):
                raise UserError(f'cannot read image {name} (no such file); give an image file, a PIL image or a '
                                'uint8 array')
        # files are read when their views are made, one at a time; images in memory are used as they are
        decoded = [None if file else as_rgb_image(image) for image, file in zip(images, is_file)]
        raw = self.raw_scores(decoded, names)
        scores = normalized_scores(raw, self.normalization)
        results = []
        for name, image, raw_score, score in zip(names, decoded, raw, scores):
            heat = gradient_map(self.model, name, self.settings, self.device, image=image)[0] if maps else None
            results.append(ImageScore(name, float(raw_score), float(score), bool(raw_score > self.threshold), heat))
        return results


def score_images(config, paths, checkpoint_path, threshold=None, score_out='scores.csv', maps_dir=''):
    """The `--score` command: scores the images of `paths` with the checkpoint (loaded once), decides with
    the threshold, prints a table and the images per second, writes the CSV (and a gradient-map PNG per
    image into `maps_dir`). Returns the ImageScores."""
    image_paths = collect_images(paths)
    problems = image_problems(image_paths)
    if problems:
        raise UserError('; '.join(f'cannot read image {path} ({reason})' for path, reason in problems)
                        + '; replace or remove it')
    scorer = Scorer(checkpoint_path, config, threshold)
    checkpoint, settings = scorer.checkpoint, scorer.settings
    logger.info(f"Checkpoint {checkpoint_path} ({checkpoint['class_name'] or 'official'}; "
        f"{checkpoint['extractor']['source']}; {settings.n_transforms_test} views at fixed rotations)")
    logger.info(f'Threshold {scorer.threshold:.6g}: {scorer.threshold_origin}; score = 1 / (1 + (threshold / raw) ^ '
        f"{scorer.normalization['exponent']:.4g}), the threshold at 0.5")
    started = time.perf_counter()
    results = scorer.score(image_paths)
    seconds = time.perf_counter() - started
    width = max(len(path) for path in image_paths)
    logger.info(f"{'file':<{width}}  {'raw score':>12}  {'score':>6}  decision")
    for result in results:
        logger.info(f"{result.name:<{width}}  {result.raw:>12.6g}  {result.score:>6.3f}  "
            f"{'anomalous' if result.anomalous else 'good'}")
    write_scores_csv(score_out, results)
    n_anomalous = sum(result.anomalous for result in results)
    logger.info(f'{len(results)} images, {n_anomalous} anomalous, {len(results) / seconds:.2f} images/s '
        f'({settings.n_transforms_test} views each); wrote {score_out}')
    if maps_dir:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in image_paths])
        for result in results:
            export_map(scorer.model, result.name, os.path.basename(os.path.dirname(os.path.abspath(result.name))),
                       settings, scorer.device, os.path.join(maps_dir, map_file_name(result.name, root)),
                       score=result.raw)
        logger.info(f'gradient maps: {len(results)} PNGs in {maps_dir}')
    return results


def score_command(config, args):
    """The --score command, after checking its options go together."""
    if not args.score or not args.checkpoint:
        raise UserError('--score PATH... and --checkpoint FILE go together, e.g. '
                        '--score data/new_parts --checkpoint results/RUN/bottle_checkpoint.pt')
    score_images(config, args.score, args.checkpoint, threshold=args.threshold, score_out=args.score_out,
                 maps_dir=args.maps)
