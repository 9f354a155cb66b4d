"""Data for DifferNet: finding the images of a class, turning each into n augmented views, the demo set.

The official DifferNet layout, one folder per class under `dataset_path`:

    <dataset_path>/
    └── <class_name>/
        ├── train/
        │   └── good/            defect-free training images
        └── test/
            ├── good/            defect-free test images        -> label 0
            ├── <defect type>/   any other folder name          -> label 1
            └── ...

Any image format Pillow reads is accepted (png, jpg, bmp, tif, ...); hidden files are ignored.
"""
import difflib
import hashlib
import json
import os
import random

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF

EXPECTED_TREE = '<dataset_path>/<class>/train/good/*.png and <class>/test/{good,<defect type>}/*.png'
DEMO_DATASET_PATH = os.path.join('data', 'demo')  # generated on first use; ignored by git
DEMO_CLASS = 'demo_washer'


class UserError(Exception):
    """A mistake in the input (path, value, file) that the user can fix; main.py prints it in one line."""


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for but CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device '{name}' is not a device; use 'auto', 'cpu' or 'cuda'") from None


def image_extensions():
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def list_images(folder):
    """Sorted paths of the image files directly in `folder` (by extension Pillow knows)."""
    extensions = image_extensions()
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if not name.startswith('.') and os.path.splitext(name)[1].lower() in extensions
                  and os.path.isfile(os.path.join(folder, name)))


def class_folders(dataset_path):
    return sorted(name for name in os.listdir(dataset_path)
                  if os.path.isdir(os.path.join(dataset_path, name)) and not name.startswith('.'))


def find_class_samples(dataset_path, class_name):
    """Returns (train_samples, test_samples), each a list of (path, label, defect_type).

    Raises UserError naming the missing or empty folder and the expected tree.
    """
    if not os.path.isdir(dataset_path):
        raise UserError(f'dataset path {dataset_path} does not exist; expected {EXPECTED_TREE}')
    class_root = os.path.join(dataset_path, class_name)
    if not os.path.isdir(class_root):
        known = class_folders(dataset_path)
        close = difflib.get_close_matches(class_name, known, n=3, cutoff=0.4)
        hint = f'did you mean {", ".join(close)}?' if close else f'classes found: {", ".join(known) or "none"}'
        raise UserError(f"class '{class_name}' not found in {dataset_path} ({hint}); expected {EXPECTED_TREE}")
    train_good = os.path.join(class_root, 'train', 'good')
    test_root = os.path.join(class_root, 'test')
    for folder in (train_good, os.path.join(test_root, 'good')):
        if not os.path.isdir(folder):
            raise UserError(f'missing folder {folder}; expected {EXPECTED_TREE}')
        if not list_images(folder):
            raise UserError(f'no images in {folder}; expected {EXPECTED_TREE}')
    train = [(path, 0, 'good') for path in list_images(train_good)]
    test = []
    for defect_type in class_folders(test_root):
        label = 0 if defect_type == 'good' else 1
        test += [(path, label, defect_type) for path in list_images(os.path.join(test_root, defect_type))]
    return train, test


def check_images_readable(paths):
    """Raises UserError for the first file Pillow cannot read, before any training starts."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:
            raise UserError(f'cannot read image {path} ({type(error).__name__}); '
                            f'replace or remove it (expected {EXPECTED_TREE})') from None


def split_validation(samples, fraction, seed):
    """(training, validation) samples: round(fraction * n) of them (at least 1 when fraction > 0) held
    out, picked with numpy seed `seed` from the samples in sorted order; both parts stay sorted. The
    same files, fraction and seed always give the same split."""
    samples = sorted(samples)
    if fraction <= 0:
        return samples, []
    n_validation = max(1, int(round(fraction * len(samples))))
    if n_validation >= len(samples):
        raise UserError(f'val_fraction = {fraction} holds out {n_validation} of the {len(samples)} training '
                        f'images, leaving none to train on; lower val_fraction')
    picked = set(np.random.RandomState(seed).choice(len(samples), n_validation, replace=False).tolist())
    return ([s for i, s in enumerate(samples) if i not in picked],
            [s for i, s in enumerate(samples) if i in picked])


def load_rgb(path):
    try:
        with Image.open(path) as image:
            return image.convert('RGB')
    except Exception as error:
        raise UserError(f'cannot read image {path} ({type(error).__name__}); replace or remove it') from None


def view_transform(config, rotation_angle=None):
    """PIL image -> normalized tensor, as the official code: Resize((s, s)) on the PIL image, then
    RandomRotation(180) (or the fixed `rotation_angle`), optional ColorJitter, ToTensor, Normalize."""
    steps = [transforms.Resize((config.img_size, config.img_size))]
    if rotation_angle is not None:
        steps.append(transforms.Lambda(lambda image: TF.rotate(image, rotation_angle)))
    elif config.transf_rotations:
        steps.append(transforms.RandomRotation(180))
    if config.transf_brightness > 0 or config.transf_contrast > 0 or config.transf_saturation > 0:
        steps.append(transforms.ColorJitter(brightness=config.transf_brightness,
                                            contrast=config.transf_contrast,
                                            saturation=config.transf_saturation))
    steps += [transforms.ToTensor(), transforms.Normalize(config.norm_mean, config.norm_std)]
    return transforms.Compose(steps)


def fixed_angles(n_views):
    return [i * 360.0 / n_views for i in range(n_views)]


class MultiViewDataset(Dataset):
    """Each item is (views, label): `n_views` augmented copies of one image, stacked to (n, 3, s, s).

    Random views draw from torch's global generator (the official behaviour), so a seeded run repeats
    them. With `view_seed` set, the views of item i are drawn from the seed (view_seed, i) instead,
    whatever the order, batching or worker that loads it: the same image always gets the same views,
    which is what lets extracted features be pooled and cached. With `fixed_rotations` the views are
    rotated by i * 360 / n_views degrees.
    """

    def __init__(self, samples, n_views, config, fixed_rotations=False, view_seed=None):
        self.samples = list(samples)
        self.n_views = n_views
        self.view_seed = view_seed
        if fixed_rotations:
            self.view_transforms = [view_transform(config, angle) for angle in fixed_angles(n_views)]
        else:
            self.view_transforms = [view_transform(config)] * n_views

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label, _ = self.samples[index]
        image = load_rgb(path)
        if self.view_seed is None:
            return torch.stack([transform(image) for transform in self.view_transforms]), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.view_seed * 1_000_003 + index)
            return torch.stack([transform(image) for transform in self.view_transforms]), label

    @property
    def labels(self):
        return np.array([label for _, label, _ in self.samples])


# --- the disk cache of extracted features ------------------------------------------------------------

FEATURE_SETTINGS = ('img_size', 'n_scales', 'transf_rotations', 'transf_brightness', 'transf_contrast',
                    'transf_saturation', 'norm_mean', 'norm_std', 'channels_last', 'bf16_autocast')


def feature_cache_key(samples, n_views, view_seed, fixed_rotations, weights_digest, config):
    """A digest of everything extracted features depend on: each file (path, modification time, size),
    the transform and extractor settings, the number of views, their seed, and the AlexNet weights."""
    files = []
    for path, label, defect_type in samples:
        stat = os.stat(path)
        files.append([os.path.abspath(path), stat.st_mtime_ns, stat.st_size, label, defect_type])
    key = {'files': files, 'n_views': n_views, 'view_seed': view_seed, 'fixed_rotations': fixed_rotations,
           'weights': weights_digest, 'settings': {name: getattr(config, name) for name in FEATURE_SETTINGS}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()


def load_cached_features(cache_dir, key):
    """(features, labels) stored under `key`, or None."""
    path = os.path.join(cache_dir, f'features_{key}.pt')
    if not os.path.isfile(path):
        return None
    try:
        stored = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None
    if stored.get('key') != key:
        return None
    return stored['features'], stored['labels'].numpy()


def save_cached_features(cache_dir, key, features, labels):
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f'features_{key}.pt')
    torch.save({'key': key, 'features': features.cpu(), 'labels': torch.as_tensor(labels)}, path + '.part')
    os.replace(path + '.part', path)


# --- the embedded demo dataset -------------------------------------------------------------------

DEMO_COUNTS = {'train/good': 8, 'test/good': 4, 'test/scratch': 2, 'test/crack': 2, 'test/stain': 2}
DEMO_IMAGE_SIZE = 224


def ensure_demo_dataset(dataset_path):
    """Generates the demo set into `dataset_path` unless it is already there; returns True if made now."""
    class_root = os.path.join(dataset_path, DEMO_CLASS)
    expected = sum(DEMO_COUNTS.values())
    if os.path.isdir(class_root) and sum(len(files) for _, _, files in os.walk(class_root)) == expected:
        return False
    generate_demo_dataset(dataset_path)
    return True


def generate_demo_dataset(dataset_path, seed=0):
    """Writes a small deterministic set of photos-like washers in the official layout.

        <dataset_path>/demo_washer/train/good/000.png ...   8 defect-free washers
        <dataset_path>/demo_washer/test/good/               4 defect-free washers
        <dataset_path>/demo_washer/test/{scratch,crack,stain}/   2 each, visible defects

    Washers vary a little in position, size, brightness and texture, as parts on a conveyor would.
    """
    rng = np.random.RandomState(seed)
    for folder, count in DEMO_COUNTS.items():
        out_dir = os.path.join(dataset_path, DEMO_CLASS, *folder.split('/'))
        os.makedirs(out_dir, exist_ok=True)
        defect = folder.split('/')[1]
        for i in range(count):
            image = draw_washer(rng, defect)
            image.save(os.path.join(out_dir, f'{i:03d}.png'))


def draw_washer(rng, defect='good'):
    size = DEMO_IMAGE_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.uniform(-4, 4, size=2)
    outer, inner = 78 + rng.uniform(-2, 2), 30 + rng.uniform(-1.5, 1.5)
    radius = np.hypot(xx - cx, yy - cy)
    ring = (radius <= outer) & (radius >= inner)
    brightness = rng.uniform(0.92, 1.08)
    # brushed metal: radial shading plus a fine concentric texture
    metal = 150 + 50 * np.cos((radius - inner) / (outer - inner) * np.pi) + 6 * np.sin(radius * 1.7)
    background = 40 + rng.normal(0, 3, size=(size, size))
    gray = np.where(ring, metal * brightness, background) + rng.normal(0, 2, size=(size, size))
    rgb = np.stack([gray, gray * 0.98, gray * 0.95], axis=-1)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), 'RGB')
    draw = ImageDraw.Draw(image)
    angle = rng.uniform(0, 2 * np.pi)
    if defect == 'scratch':
        r0, r1 = inner + 6, outer - 6
        start = (cx + r0 * np.cos(angle), cy + r0 * np.sin(angle))
        end = (cx + r1 * np.cos(angle + 0.5), cy + r1 * np.sin(angle + 0.5))
        draw.line([start, end], fill=(25, 22, 20), width=5)
    elif defect == 'crack':
        # a wedge broken out of the ring, showing the background
        span = np.degrees(rng.uniform(0.35, 0.5))
        start = np.degrees(angle)
        draw.pieslice([cx - outer - 2, cy - outer - 2, cx + outer + 2, cy + outer + 2],
                      start, start + span, fill=(40, 39, 38))
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=(40, 39, 38))
    elif defect == 'stain':
        r = (inner + outer) / 2
        px, py = cx + r * np.cos(angle), cy + r * np.sin(angle)
        blob = rng.uniform(13, 17)
        draw.ellipse([px - blob, py - blob, px + blob, py + blob], fill=(170, 80, 20))
    return image.filter(ImageFilter.SMOOTH)
