"""Data for DifferNet: finding the images of a class, turning each into n augmented views, the demo set,
the disk cache of features, atomic files and AUROC, and scoring new images (report.py writes the results
tables, plots and report.html).

Three layouts are read where they lie, detected per class (`detect_layout`):

The official DifferNet layout, one folder per class under `dataset_path`:

    <dataset_path>/<class>/
    ├── train/good/              defect-free training images
    └── test/
        ├── good/                defect-free test images            -> label 0
        └── <defect type>/       any other folder name              -> label 1

MVTec AD as distributed: the same, plus pixel masks of the defective test images:

    <dataset_path>/<class>/
    ├── train/good/
    ├── test/{good, <defect type>, ...}/
    └── ground_truth/<defect type>/<name>_mask.png

BTAD (BeanTech Anomaly Detection) as distributed (.bmp images in class 01, .png elsewhere):

    <dataset_path>/{01,02,03}/
    ├── train/ok/                defect-free training images
    ├── test/ok/                 defect-free test images            -> label 0
    ├── test/ko/                 anomalous test images              -> label 1
    └── ground_truth/ko/<name>.png

Any image format Pillow reads is accepted (png, jpg, bmp, tif, ...); hidden files are ignored.
"""
import contextlib
import csv
import difflib
import hashlib
import io
import json
import math
import os
import random
import shutil
import socket
import tempfile
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF

EXPECTED_TREE = ('<dataset_path>/<class>/train/good/*.png and <class>/test/{good,<defect type>}/*.png '
                 '(or BTAD: <class>/train/ok, <class>/test/{ok,ko})')
NORMAL_FOLDERS = {'official': 'good', 'mvtec': 'good', 'btad': 'ok'}
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


def cpu_feature(name):
    """torch's own check of a CPU feature ('amx_tile', 'avx512_bf16'); False where this torch lacks it."""
    check = getattr(torch.cpu, f'_is_{name}_supported', None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def bf16_pays_off(device):
    """(whether bfloat16 autocast makes `device` faster than float32, why), for bf16_autocast 'auto'.

    CUDA: where the GPU computes bfloat16. CPU: only with AMX. AVX512-BF16 alone is native too, but there
    bfloat16 ran slower than float32 (AlexNet 20.1 vs 27.1 views/s, flow step 1.04 vs 0.71 s; with AMX
    AlexNet ran 5.4x faster): docs/performance.md."""
    if device.type == 'cuda':
        native = torch.cuda.is_bf16_supported()
        return native, 'cuda computes bfloat16 natively' if native else 'cuda has no native bfloat16'
    if cpu_feature('amx_tile'):
        return True, 'cpu has AMX, which computes bfloat16 natively'
    if cpu_feature('avx512_bf16'):
        return False, 'cpu has AVX512-BF16 but no AMX; there bfloat16 ran slower than float32'
    return False, 'cpu has no native bfloat16'


def choose_precision(setting, fast_bf16, why):
    """(use_bf16, the line that says what was chosen and why) for `bf16_autocast` = True, False or 'auto';
    `fast_bf16` and `why` come from bf16_pays_off.

    'auto' takes bfloat16 only where it is faster; elsewhere (emulated, or AVX512-BF16 without AMX)
    AlexNet and the flow run slower than in float32 (docs/performance.md)."""
    if setting == 'auto':
        return fast_bf16, f"precision: {'bfloat16' if fast_bf16 else 'float32'} (bf16_autocast auto: {why})"
    if setting and not fast_bf16:
        return True, (f'warning: precision: bfloat16 (bf16_autocast true) although {why}: AlexNet and the flow '
                      f'run slower than in float32; use --bf16_autocast auto or false')
    if setting:
        return True, 'precision: bfloat16 (bf16_autocast true)'
    hint = '; --bf16_autocast auto would use it (docs/performance.md)' if fast_bf16 else ''
    return False, f'precision: float32 (bf16_autocast false, as the paper; {why}{hint})'


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


class Sample(NamedTuple):
    """One image: its path, label (0 normal, 1 anomalous), defect type (folder name) and mask, if any."""
    path: str
    label: int
    defect_type: str
    mask_path: Optional[str] = None


def detect_layout(class_root):
    """'btad' (train/ok), 'mvtec' (good folders plus ground_truth/) or 'official' (good folders only)."""
    if os.path.isdir(os.path.join(class_root, 'train', 'ok')):
        return 'btad'
    if os.path.isdir(os.path.join(class_root, 'ground_truth')):
        return 'mvtec'
    return 'official'


def find_mask(class_root, defect_type, image_path):
    """ground_truth/<defect type>/<name>_mask.<ext> (MVTec AD) or <name>.<ext> (BTAD), else None."""
    folder = os.path.join(class_root, 'ground_truth', defect_type)
    if not os.path.isdir(folder):
        return None
    stem = os.path.splitext(os.path.basename(image_path))[0]
    for candidate in list_images(folder):
        if os.path.splitext(os.path.basename(candidate))[0] in (f'{stem}_mask', stem):
            return candidate
    return None


def find_class_samples(dataset_path, class_name):
    """Returns (train_samples, test_samples), lists of Sample, in any of the three layouts.

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
    normal = NORMAL_FOLDERS[detect_layout(class_root)]
    train_normal = os.path.join(class_root, 'train', normal)
    test_root = os.path.join(class_root, 'test')
    for folder in (train_normal, os.path.join(test_root, normal)):
        if not os.path.isdir(folder):
            raise UserError(f'missing folder {folder}; expected {EXPECTED_TREE}')
        if not list_images(folder):
            raise UserError(f'no images in {folder}; expected {EXPECTED_TREE}')
    train = [Sample(path, 0, normal) for path in list_images(train_normal)]
    test = []
    for defect_type in class_folders(test_root):
        label = 0 if defect_type == normal else 1
        test += [Sample(path, label, defect_type, find_mask(class_root, defect_type, path) if label else None)
                 for path in list_images(os.path.join(test_root, defect_type))]
    return train, test


class DataProblems(UserError):
    """Every unusable file of a class, found in one scan; str() lists them one per line."""

    def __init__(self, class_name, problems):
        self.problems = problems
        lines = [f'class {class_name}: {len(problems)} unusable file(s) or folder(s); fix or remove them:']
        super().__init__('\n'.join(lines + [f'  - {path}: {reason}' for path, reason in problems]))


def scan_class(dataset_path, class_name, train_samples, test_samples):
    """Opens and decodes every file of a class once, before any training.

    Returns the warnings (list of str). Raises DataProblems listing, with paths, every file that is not a
    readable image: zero-byte, truncated or corrupt files, non-image files in the image folders. Modes
    other than RGB (grayscale, RGBA, palette, 16-bit) are fine: `load_rgb` converts them.
    """
    class_root = os.path.join(dataset_path, class_name)
    problems, sizes = [], {}
    folders = sorted({os.path.dirname(sample.path) for sample in train_samples + test_samples})
    for folder in folders:
        images = set(list_images(folder))
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.startswith('.') or not os.path.isfile(path) or path in images:
                continue
            problems.append((path, f'not an image file ({os.path.splitext(name)[1] or "no extension"}); '
                                   f'move it out of {folder}'))
    problems += image_problems([sample.path for sample in train_samples + test_samples], sizes)
    if problems:
        raise DataProblems(class_name, problems)
    warnings = []
    areas = np.array([width * height for width, height in sizes.values()], dtype=np.float64)
    if len(areas) and areas.max() > 16 * areas.min():
        smallest = min(sizes, key=lambda path: sizes[path][0] * sizes[path][1])
        largest = max(sizes, key=lambda path: sizes[path][0] * sizes[path][1])
        warnings.append(f'image sizes differ widely in {class_root}: {smallest} is {sizes[smallest]}, '
                        f'{largest} is {sizes[largest]}; all are resized to the same square input')
    if not any(sample.label for sample in test_samples):
        warnings.append(f'{class_root}/test has no anomalous images: AUROC is not defined, only the test loss '
                        'is reported')
    return warnings


def image_problems(paths, sizes=None):
    """[(path, reason)] for each file that is not a readable image (zero bytes, truncated, corrupt); the
    size of each good one goes into `sizes` if given."""
    problems = []
    for path in paths:
        if os.path.getsize(path) == 0:
            problems.append((path, 'zero-byte file'))
            continue
        try:
            with Image.open(path) as image:
                image.load()  # a full decode: verify() alone misses truncated pixel data
                if sizes is not None:
                    sizes[path] = image.size
        except Exception as error:
            problems.append((path, f'not a readable image ({type(error).__name__}: {str(error)[:80]})'))
    return problems


def to_rgb(image):
    """RGB version of any Pillow image: 16-bit grayscale is scaled to 8 bits (Pillow's own convert would
    clip it to white), alpha is dropped (as the official loader does), palettes are expanded."""
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N') or (image.mode == 'I' and image.getextrema()[1] > 255):
        array = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), 'L')
    elif image.mode in ('I', 'F'):
        image = Image.fromarray(np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8), 'L')
    return image.convert('RGB')


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
            return to_rgb(image)
    except Exception as error:
        raise UserError(f'cannot read image {path} ({type(error).__name__}); replace or remove it') from None


def resize_transform(config):
    return transforms.Resize((config.img_size, config.img_size))


def color_jitter(config):
    """The official ColorJitter, or None when every factor is 0."""
    if config.transf_brightness > 0 or config.transf_contrast > 0 or config.transf_saturation > 0:
        return transforms.ColorJitter(brightness=config.transf_brightness, contrast=config.transf_contrast,
                                      saturation=config.transf_saturation)
    return None


def augment_transform(config, rotation_angle=None):
    """The steps of `view_transform` after the (deterministic) resize: the random ones and the tensor."""
    steps = []
    if rotation_angle is not None:
        steps.append(transforms.Lambda(lambda image: TF.rotate(image, rotation_angle)))
    elif config.transf_rotations:
        steps.append(transforms.RandomRotation(180))
    jitter = color_jitter(config)
    if jitter is not None:
        steps.append(jitter)
    steps += [transforms.ToTensor(), transforms.Normalize(config.norm_mean, config.norm_std)]
    return transforms.Compose(steps)


def view_transform(config, rotation_angle=None):
    """PIL image -> normalized tensor, as the official code: Resize((s, s)) on the PIL image, then
    RandomRotation(180) (or the fixed `rotation_angle`), optional ColorJitter, ToTensor, Normalize."""
    return transforms.Compose([resize_transform(config), augment_transform(config, rotation_angle)])


def fixed_angles(n_views):
    return [i * 360.0 / n_views for i in range(n_views)]


VIEW_BACKENDS = ('auto', 'pil', 'tensor')
CPU_VIEW_BACKEND = 'pil'  # what 'auto' means on a CPU: the faster one on the idle CPU in benchmarks/views.py (docs/gpu.md)
ROTATION_CHUNK = 32  # views rotated at a time: their coordinates take ~40 MB at 448 px
DEVICE_IMAGE_SHARE = 0.25  # kept images go onto the GPU when they take less than this share of its free memory


def resolve_view_backend(name, device):
    """'pil' or 'tensor' for the `view_backend` setting on `device`."""
    if name not in VIEW_BACKENDS:
        raise UserError(f"view_backend = '{name}' is not one of {', '.join(VIEW_BACKENDS)}; use --view_backend auto")
    if name == 'auto':
        return 'tensor' if device.type == 'cuda' else CPU_VIEW_BACKEND
    return name


def pil_rotation_matrices(angles, size):
    """(V, 6) float64: for each angle (degrees, counter-clockwise) the inverse affine map (a, b, c, d, e, f)
    with which PIL's Image.rotate(angle, NEAREST, expand=False) samples a square image of side `size`:
    output pixel (x, y) takes the source pixel (floor(a x' + b y' + c), floor(d x' + e y' + f)) at the
    pixel centre x' = x + 0.5, y' = y + 0.5. Computed in Python as Image.rotate computes it (cos and sin
    rounded to 15 decimals, the same order of operations), so the coefficients are PIL's to the bit."""
    rows = []
    centre = size / 2
    for angle in angles:
        radians = -math.radians(float(angle) % 360.0)
        a, b = round(math.cos(radians), 15), round(math.sin(radians), 15)
        d, e = round(-math.sin(radians), 15), round(math.cos(radians), 15)
        c = a * -centre + b * -centre + 0.0 + centre
        f = d * -centre + e * -centre + 0.0 + centre
        rows.append([a, b, c, d, e, f])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 6)


def fixed_point(values):
    """PIL's FIX(v) = floor(v * 65536 + 0.5): 16.16 fixed point, as int64."""
    return torch.floor(values * 65536.0 + 0.5).long()


def rotate_nearest(images, angles):
    """uint8 (V, C, s, s) -> each image rotated by its angle (degrees) as PIL's NEAREST Image.rotate,
    the rotation of RandomRotation(180) (fill 0, no expand), in one gather on the images' device.
    PIL's nearest affine transform runs in 16.16 fixed point (Geometry.c, affine_fixed): the source of
    output pixel (x, y) is ((A2 + y A1 + x A0) >> 16, (A5 + y A4 + x A3) >> 16) with A = FIX(matrix) and
    the start A2 = FIX(c + a/2 + b/2). Integer arithmetic, so the pixels are PIL's on any device."""
    count, channels, height, width = images.shape
    if height != width:
        raise ValueError(f'rotate_nearest needs square images, got {height} x {width}')
    if count > ROTATION_CHUNK:  # the integer coordinates take 4-8 bytes per pixel and view: bounded
        return torch.cat([rotate_nearest(images[start:start + ROTATION_CHUNK], angles[start:start + ROTATION_CHUNK])
                          for start in range(0, count, ROTATION_CHUNK)])
    a, b, c, d, e, f = pil_rotation_matrices(angles, width).unbind(dim=1)
    # 16.16 values stay below 2^31 up to sides of several thousand pixels: int32 halves the traffic
    integer = torch.int32 if width <= 4096 else torch.int64
    steps = fixed_point(torch.stack([a, b, d, e], dim=1)).to(images.device, integer)
    starts = fixed_point(torch.stack([c + a * 0.5 + b * 0.5, f + d * 0.5 + e * 0.5], dim=1)).to(images.device, integer)
    pixels = torch.arange(width, dtype=integer, device=images.device)
    # the row start plus the column step, broadcast: (V, s, 1) + (V, 1, s)
    source_x = (starts[:, :1, None] + pixels.view(1, -1, 1) * steps[:, 1, None, None]
                + pixels.view(1, 1, -1) * steps[:, 0, None, None]) >> 16
    source_y = (starts[:, 1:, None] + pixels.view(1, -1, 1) * steps[:, 3, None, None]
                + pixels.view(1, 1, -1) * steps[:, 2, None, None]) >> 16
    inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
    flat_index = (source_y.clamp_(0, height - 1) * width + source_x.clamp_(0, width - 1)).long().view(count, 1, -1)
    rotated = images.reshape(count, channels, -1).gather(2, flat_index.expand(count, channels, -1))
    rotated *= inside.view(count, 1, -1)
    return rotated.view_as(images)


def pil_luminance(images):
    """uint8 (V, 3, s, s) -> int32 (V, s, s): PIL's convert('L'), L = (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
    weighted = images.int() * torch.tensor([19595, 38470, 7471], dtype=torch.int32, device=images.device).view(1, 3, 1, 1)
    return (weighted.sum(dim=1) + 0x8000) >> 16


def pil_blend(degenerate, images, factors):
    """PIL's Image.blend(degenerate, image, factor) in float32, truncated to uint8 like its C loop."""
    factors = factors.to(device=images.device, dtype=torch.float32).view(-1, 1, 1, 1)
    low = degenerate.float()
    return (low + factors * (images.float() - low)).clamp(0, 255).to(torch.uint8)


def jitter_like_pil(images, order, factors, enabled):
    """ColorJitter of uint8 views (V, 3, s, s) as torchvision does it on PIL images (ImageEnhance:
    Brightness, Contrast, Color), each view with its own order (V, 4) and factors (V, 3) (brightness,
    contrast, saturation); `enabled` the ops ColorJitter has (a factor of 1 leaves a view unchanged)."""
    order, factors = order.to(images.device), factors.to(images.device)
    for position in range(4):
        for op in enabled:
            factor = torch.where(order[:, position] == op, factors[:, op], torch.ones_like(factors[:, op]))
            if op == 0:
                degenerate = torch.zeros_like(images)
            elif op == 1:
                luminance = pil_luminance(images).double()
                mean = torch.floor(luminance.mean(dim=(1, 2)) + 0.5).to(torch.uint8)
                degenerate = mean.view(-1, 1, 1, 1).expand_as(images)
            else:
                degenerate = pil_luminance(images).to(torch.uint8).unsqueeze(1).expand_as(images)
            images = pil_blend(degenerate, images, factor)
    return images


def pil_to_uint8(image):
    """PIL RGB image -> uint8 tensor (3, h, w), the pixels as they are."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def place_images(images, device):
    """The kept images where views are made from: on a CUDA device when they take under
    DEVICE_IMAGE_SHARE of its free memory, else in pinned host memory (copied per batch without
    blocking); on the CPU as they are."""
    if device.type != 'cuda':
        return images
    free_bytes, _ = torch.cuda.mem_get_info(device)
    if images.numel() * images.element_size() < DEVICE_IMAGE_SHARE * free_bytes:
        return images.to(device)
    return images.pin_memory()


class MultiViewDataset(Dataset):
    """Each item is (views, label): `n_views` augmented copies of one image, stacked to (n, 3, s, s).

    Random views draw from torch's global generator (the official behaviour), so a seeded run repeats
    them. With `view_seed` set, the views of item i are drawn from the seed (view_seed, i) instead,
    whatever the order, batching or worker that loads it: the same image always gets the same views,
    which is what lets extracted features be pooled and cached. With `fixed_rotations` the views are
    rotated by i * 360 / n_views degrees.

    Each image is decoded and resized once per item rather than once per view (the resize is
    deterministic, so the views are the same tensors as the official per-view Compose). With
    `keep_images`, the resized image is kept in memory (img_size^2 x 3 bytes per image: 126 MB for
    bottle's 209) and later epochs skip decoding: it saves ~8 s per on-line sub epoch on bottle. Workers
    each keep their own copy, so it only pays off with persistent workers or none.

    backend 'tensor': an item is (recipe, label) instead, the recipe holding the item's index and the
    random parameters of its views (angles, ColorJitter order and factors), drawn from the same stream
    in the same order as the PIL transforms draw them; `make_views` turns a collated batch of recipes
    into views with tensor operations on the device, from every image decoded and resized once (with
    the same PIL Resize) and kept as uint8. The views equal the PIL path's (docs/gpu.md).
    """

    def __init__(self, samples, n_views, config, fixed_rotations=False, view_seed=None, keep_images=False,
                 backend='pil'):
        if backend not in ('pil', 'tensor'):
            raise ValueError(f"backend must be 'pil' or 'tensor', got {backend!r}")
        self.samples = list(samples)
        self.n_views = n_views
        self.view_seed = view_seed
        self.backend = backend
        self.resize = resize_transform(config)
        self.kept_images = {} if keep_images and backend == 'pil' else None
        self.angles = fixed_angles(n_views) if fixed_rotations else None
        self.random_rotation = bool(config.transf_rotations) and not fixed_rotations
        self.jitter = color_jitter(config)
        self.norm_mean, self.norm_std = tuple(config.norm_mean), tuple(config.norm_std)
        self.images = None  # tensor backend: uint8 (N, 3, s, s), made on first use by `image_tensor`
        if fixed_rotations:
            self.view_transforms = [augment_transform(config, angle) for angle in self.angles]
        else:
            self.view_transforms = [augment_transform(config)] * n_views

    def __len__(self):
        return len(self.samples)

    def resized_image(self, index):
        if self.kept_images is not None and index in self.kept_images:
            return self.kept_images[index]
        image = self.resize(load_rgb(self.samples[index].path))
        if self.kept_images is not None:
            self.kept_images[index] = image
        return image

    @contextlib.contextmanager
    def view_stream(self, index):
        """Draws inside come from the seed (view_seed, index) when view_seed is set, and the global
        stream is left as it was. Only the CPU generator is seeded: torch.manual_seed would also reseed
        every CUDA generator, which fork_rng(devices=[]) does not restore."""
        if self.view_seed is None:
            yield
            return
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.view_seed * 1_000_003 + index)
            yield

    def __getitem__(self, index):
        label = self.samples[index].label
        if self.backend == 'tensor':
            with self.view_stream(index):
                return self.draw_recipe(index), label
        image = self.resized_image(index)
        with self.view_stream(index):
            return torch.stack([transform(image) for transform in self.view_transforms]), label

    def draw_recipe(self, index):
        """The random parameters of the item's views, drawn as RandomRotation(180) then ColorJitter draw
        them, view after view (`view_transforms` draw the same numbers from the same stream)."""
        angles = torch.zeros(self.n_views, dtype=torch.float64)
        order = torch.arange(4).repeat(self.n_views, 1)
        factors = torch.ones(self.n_views, 3, dtype=torch.float64)
        for view in range(self.n_views):
            if self.angles is not None:
                angles[view] = self.angles[view]
            elif self.random_rotation:
                angles[view] = transforms.RandomRotation.get_params([-180.0, 180.0])
            if self.jitter is not None:
                permutation, *drawn = transforms.ColorJitter.get_params(
                    self.jitter.brightness, self.jitter.contrast, self.jitter.saturation, self.jitter.hue)
                order[view] = permutation
                factors[view] = torch.tensor([1.0 if value is None else value for value in drawn[:3]])
        return {'index': index, 'angles': angles, 'jitter_order': order, 'jitter_factors': factors}

    def image_tensor(self, device):
        """uint8 (N, 3, s, s) of every image, decoded and resized once (PIL Resize, as the PIL path),
        placed by `place_images`."""
        if self.images is None:
            self.images = place_images(torch.stack([pil_to_uint8(self.resized_image(i)) for i in range(len(self))]),
                                       device)
        return self.images

    def make_views(self, recipe, device):
        """Views (B, n_views, 3, s, s) float32 on `device` of a collated batch of recipes: rotation,
        ColorJitter, /255 and normalization, as the PIL path, batched."""
        images = self.image_tensor(device)
        index = recipe['index']
        # (devices are not compared: torch.device('cuda') differs from the 'cuda:0' a tensor reports)
        if images.is_pinned():  # the gathered rows are pinned again so that the copy does not block
            batch = images[index].pin_memory().to(device, non_blocking=True)
        else:
            batch = images[index.to(images.device)].to(device)
        count, n_views = recipe['angles'].shape
        size = batch.shape[-1]
        views = batch.unsqueeze(1).expand(count, n_views, *batch.shape[1:]).reshape(-1, *batch.shape[1:])
        angles = recipe['angles'].reshape(-1)
        if bool((torch.remainder(angles, 360.0) != 0).any()):
            views = rotate_nearest(views, angles.tolist())
        if self.jitter is not None:
            enabled = [op for op, value in enumerate((self.jitter.brightness, self.jitter.contrast,
                                                      self.jitter.saturation)) if value is not None]
            views = jitter_like_pil(views, recipe['jitter_order'].reshape(-1, 4),
                                    recipe['jitter_factors'].reshape(-1, 3), enabled)
        mean = torch.tensor(self.norm_mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.norm_std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        views = views.float().div(255).sub(mean).div(std)
        return views.view(count, n_views, 3, size, size)

    def views_of(self, index, device):
        """The views (n_views, 3, s, s) of item `index` on `device`, from either backend."""
        item, _ = self[index]
        if self.backend == 'pil':
            return item.to(device)
        return self.make_views(torch.utils.data.default_collate([item]), device)[0]

    @property
    def labels(self):
        return np.array([sample.label for sample in self.samples])


# --- the disk cache of extracted features ------------------------------------------------------------

FEATURE_SETTINGS = ('img_size', 'n_scales', 'transf_rotations', 'transf_brightness', 'transf_contrast',
                    'transf_saturation', 'norm_mean', 'norm_std', 'channels_last', 'bf16_autocast')
FEATURE_CACHE_FORMAT = 2  # raise when what a cache file holds, or how its key is made, changes


def feature_cache_key(samples, n_views, view_seed, fixed_rotations, weights_digest, config, device):
    """A digest of everything extracted features depend on: each file (path, modification time, size),
    the transform and extractor settings, the number of views, their seed, the AlexNet weights, and the
    arithmetic: device type, torch version and, on CUDA, TF32 (other kernels give other float rounding)."""
    files = []
    for sample in samples:
        stat = os.stat(sample.path)
        files.append([os.path.abspath(sample.path), stat.st_mtime_ns, stat.st_size, sample.label, sample.defect_type])
    arithmetic = {'device': torch.device(device).type, 'torch': torch.__version__}
    if arithmetic['device'] == 'cuda':
        arithmetic['tf32'] = [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]
    key = {'format': FEATURE_CACHE_FORMAT, 'files': files, 'n_views': n_views, 'view_seed': view_seed,
           'fixed_rotations': fixed_rotations, 'weights': weights_digest, 'arithmetic': arithmetic,
           'settings': {name: getattr(config, name) for name in FEATURE_SETTINGS}}
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
    stored = {'key': key, 'features': features.cpu(), 'labels': torch.as_tensor(labels)}
    replace_atomically(path, lambda part: torch.save(stored, part))


# --- the embedded demo dataset -------------------------------------------------------------------

DEMO_COUNTS = {'train/good': 6, 'test/good': 3, 'test/scratch': 2, 'test/crack': 2, 'test/stain': 2}
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

        <dataset_path>/demo_washer/train/good/000.png ...   6 defect-free washers
        <dataset_path>/demo_washer/test/good/               3 defect-free washers
        <dataset_path>/demo_washer/test/{scratch,crack,stain}/   2 each, visible defects

    Washers vary a little in position, size, brightness and texture, as parts on a conveyor would.
    """
    rng = np.random.RandomState(seed)
    shutil.rmtree(os.path.join(dataset_path, DEMO_CLASS), ignore_errors=True)  # no leftovers of another version
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


# --- atomic files, and the AUROC of a set of scores (train.py, main.py; report.py writes the tables) ---

def json_safe(value):
    """Replaces NaN and infinities (an undefined AUROC) by None, which JSON can hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (np.floating, np.integer)):
        return json_safe(value.item())
    return value


def replace_atomically(path, write):
    """Calls write(temporary path), syncs it to disk, then renames it to `path`: a reader (or a resumed
    run) never sees half a file, even after a power cut, and the temporary file does not survive a
    failure or an interruption. Each call gets its own temporary file beside `path`, so processes
    writing the same file at once (ranks of a sweep, two runs sharing the feature cache) never touch
    each other's; the last rename wins and every reader sees one whole file."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, part = tempfile.mkstemp(dir=folder, prefix=temporary_prefix(path) + f'{socket.gethostname()}-{os.getpid()}.',
                                    suffix='.part')
    os.close(handle)
    try:
        os.chmod(part, 0o666 & ~current_umask())  # mkstemp's 0600 would make results private to one user
        write(part)
        sync_file(part)
        os.replace(part, path)
    except BaseException:
        if os.path.exists(part):
            os.remove(part)
        raise
    sync_file(folder)  # the rename itself reaches the disk
    remove_stale_temporaries(path)


def temporary_prefix(path):
    return f'.{os.path.basename(path)}.'


def remove_stale_temporaries(path):
    """Removes the temporary files of `path` that writers on this machine left when they were killed
    (SIGKILL, power cut: no handler runs); those of live processes, and of other machines sharing the
    folder, are left alone. Names: .<file>.<host>-<pid>.<random>.part"""
    folder, prefix, host = os.path.dirname(os.path.abspath(path)), temporary_prefix(path), socket.gethostname()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith('.part')):
            continue
        writer = name[len(prefix):-len('.part')].rsplit('.', 1)[0]
        writer_host, _, pid = writer.rpartition('-')
        if writer_host != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        try:
            os.remove(os.path.join(folder, name))
        except OSError:
            pass  # another process removed it first


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def sync_file(path):
    """fsync of a file or folder; some file systems cannot sync folders, which only costs durability."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path, data):
    text = json.dumps(json_safe(data), indent=2, allow_nan=False)  # fails before touching the old file
    write_text_atomic(path, text)


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


def write_text_atomic(path, text):
    def write(part):
        with open(part, 'w', newline='', encoding='utf-8') as handle:
            handle.write(text)
    replace_atomically(path, write)


def auroc_or_nan(labels, scores):
    """Image AUROC, or nan when only one label is present (AUROC is undefined then)."""
    from sklearn.metrics import roc_auc_score
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float('nan')
    return float(roc_auc_score(labels, scores))


def defect_type_aurocs(defect_types, labels, scores):
    """{defect type: AUROC of that type's images against the normal test images}."""
    defect_types, labels, scores = np.asarray(defect_types), np.asarray(labels), np.asarray(scores)
    normal = labels == 0
    return {defect: auroc_or_nan(labels[normal | (defect_types == defect)], scores[normal | (defect_types == defect)])
            for defect in sorted(set(defect_types[labels == 1]))}


# --- scoring new images: statistics of defect-free scores, the threshold, the CSV ---------------------

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
                found += [os.path.join(folder, name) for name in sorted(names)
                          if not name.startswith('.') and os.path.splitext(name)[1].lower() in extensions]
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
