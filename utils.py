"""Data for DifferNet: finding the images of a class, checking and decoding them, the validation split, and
turning each image into n augmented views (`MultiViewDataset`), as the official code's data module does.

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

Magnetic Tile Defects (MTD) as distributed, one class named `mtd` (`--dataset_path <the MTD folder>
--class_name mtd`); DifferNet's own split, shipped in splits/mtd_train_filenames.txt, names the 761
defect-free training images; the other defect-free ones and every defective one are the test set:

    <dataset_path>/
    ├── MT_Free/Imgs/<name>.jpg      defect-free (grayscale JPEG, sizes vary), <name>.png beside each
    └── MT_<Defect>/Imgs/<name>.jpg  Blowhole, Break, Crack, Fray, Uneven  -> label 1, type <defect>,
                                     mask <name>.png beside it

BTAD (BeanTech Anomaly Detection) as distributed (.bmp images in class 01, .png elsewhere):

    <dataset_path>/{01,02,03}/
    ├── train/ok/                defect-free training images
    ├── test/ok/                 defect-free test images            -> label 0
    ├── test/ko/                 anomalous test images              -> label 1
    └── ground_truth/ko/<name>.png

Any image format Pillow reads is accepted (png, jpg, bmp, tif, ...); hidden files are ignored.
"""
import contextlib
import difflib
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF

from errors import DataProblems, UserError
from image_files import Sample, image_extensions, is_image_name, list_images  # noqa: F401  (the data API)
from mtd import MTD_CLASS, find_mtd_samples, is_mtd_folder
from tensor_views import jitter_like_pil, pil_to_uint8, place_images, rotate_nearest

SUBSET_SEED_OFFSET = 3_000  # the few-shot subset's numpy seed, apart from the validation split's
EXPECTED_TREE = ('<dataset_path>/<class>/train/good/*.png and <class>/test/{good,<defect type>}/*.png '
                 '(or BTAD: <class>/train/ok, <class>/test/{ok,ko})')
NORMAL_FOLDERS = {'official': 'good', 'mvtec': 'good', 'btad': 'ok'}
CPU_VIEW_BACKEND = 'pil'  # what view_backend 'auto' means on a CPU: the faster backend there (docs/gpu.md)


def class_folders(dataset_path):
    """The classes of `dataset_path`: its sub-folders, or ['mtd'] for the MTD folder itself."""
    if is_mtd_folder(dataset_path):
        return [MTD_CLASS]
    return sorted(name for name in os.listdir(dataset_path)
                  if os.path.isdir(os.path.join(dataset_path, name)) and not name.startswith('.'))


def class_folder_of(dataset_path, class_name):
    """The folder of a class: <dataset_path>/<class>, or the MTD folder itself for class 'mtd'."""
    if class_name == MTD_CLASS and is_mtd_folder(dataset_path):
        return dataset_path
    return os.path.join(dataset_path, class_name)


def detect_layout(class_root):
    """'mtd' (MT_Free/Imgs), 'btad' (train/ok), 'mvtec' (good folders plus ground_truth/) or 'official'
    (good folders only)."""
    if is_mtd_folder(class_root):
        return 'mtd'
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
    if class_name == MTD_CLASS and is_mtd_folder(dataset_path):
        return find_mtd_samples(dataset_path)
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


def scan_class(dataset_path, class_name, train_samples, test_samples):
    """Opens and decodes every file of a class once, before any training.

    Returns the warnings (list of str). Raises DataProblems listing, with paths, every file that is not a
    readable image: zero-byte, truncated or corrupt files, non-image files in the image folders. Modes
    other than RGB (grayscale, RGBA, palette, 16-bit) are fine: `load_rgb` converts them.
    """
    root = class_folder_of(dataset_path, class_name)
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
        warnings.append(f'image sizes differ widely in {root}: {smallest} is {sizes[smallest]}, '
                        f'{largest} is {sizes[largest]}; all are resized to the same square input')
    if not any(sample.label for sample in test_samples):
        warnings.append(f'{root} has no anomalous test images: AUROC is not defined, only the test loss '
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


def n_validation_images(fraction, n_samples):
    """How many of `n_samples` training images `val_fraction` = `fraction` holds out (at least 1 when > 0)."""
    return max(1, int(round(fraction * n_samples))) if fraction > 0 else 0


def split_validation(samples, fraction, seed):
    """(training, validation) samples: round(fraction * n) of them (at least 1 when fraction > 0) held
    out, picked with numpy seed `seed` from the samples in sorted order; both parts stay sorted. The
    same files, fraction and seed always give the same split."""
    samples = sorted(samples)
    if fraction <= 0:
        return samples, []
    n_validation = n_validation_images(fraction, len(samples))
    if n_validation >= len(samples):
        raise UserError(f'val_fraction = {fraction} holds out {n_validation} of the {len(samples)} training '
                        f'images, leaving none to train on; lower val_fraction')
    picked = set(np.random.RandomState(seed).choice(len(samples), n_validation, replace=False).tolist())
    return ([s for i, s in enumerate(samples) if i not in picked],
            [s for i, s in enumerate(samples) if i in picked])


def training_subset(samples, n_images, seed):
    """The `n_images` training images of a few-shot run (n_train_images; 0 = all of `samples`): the first
    n_images of a permutation drawn with numpy seed seed + SUBSET_SEED_OFFSET from the samples in sorted
    order, kept sorted. The same files, K and seed give the same images on any machine, and the images of a
    smaller K are among those of a larger one (a prefix of the same permutation)."""
    samples = sorted(samples)
    if n_images <= 0:
        return samples
    if n_images > len(samples):
        raise UserError(f'n_train_images = {n_images} asks for more than the {len(samples)} training images '
                        f'there are; lower it, or 0 for all')
    order = np.random.RandomState(seed + SUBSET_SEED_OFFSET).permutation(len(samples))
    return sorted(samples[i] for i in order[:n_images])


def load_rgb(path):
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except Exception as error:
        raise UserError(f'cannot read image {path} ({type(error).__name__}); replace or remove it') from None


def load_mask(path):
    """Boolean (H, W) array: True where the mask marks a defect (any non-zero pixel)."""
    with Image.open(path) as mask:
        return np.asarray(mask.convert('L')) > 0


def resize_transform(config):
    return transforms.Resize((config.img_size, config.img_size))


def color_jitter(config):
    """The official ColorJitter, or None when every factor is 0."""
    if config.transf_brightness > 0 or config.transf_contrast > 0 or config.transf_saturation > 0:
        return transforms.ColorJitter(brightness=config.transf_brightness, contrast=config.transf_contrast,
                                      saturation=config.transf_saturation)
    return None


def pil_view_transform(config, rotation_angle=None):
    """The random steps of the official per-view Compose after the (deterministic) resize, on the PIL image:
    RandomRotation(180) (or the fixed `rotation_angle`), then the optional ColorJitter. ToTensor and
    Normalize follow in `normalize_views`, batched."""
    steps = []
    if rotation_angle is not None:
        steps.append(transforms.Lambda(lambda image: TF.rotate(image, rotation_angle)))
    elif config.transf_rotations:
        steps.append(transforms.RandomRotation(180))
    jitter = color_jitter(config)
    if jitter is not None:
        steps.append(jitter)
    return transforms.Compose(steps)


def normalize_views(pixels, norm_mean, norm_std):
    """uint8 views (..., 3, s, s) of any strides -> float32: /255 (ToTensor), then - mean and / std per
    channel (Normalize), the official operations in their order, so the values are ToTensor + Normalize's to
    the bit. Strides are kept: views made from PIL's (s, s, 3) pixels come out channels-last for free."""
    mean = torch.tensor(norm_mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(norm_std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return pixels.float().div_(255).sub_(mean).div_(std)


def fixed_angles(n_views):
    return [i * 360.0 / n_views for i in range(n_views)]


def resolve_view_backend(name, device):
    """'pil' or 'tensor' for the `view_backend` setting (one of settings.VIEW_BACKENDS) on `device`."""
    if name == 'auto':
        return 'tensor' if device.type == 'cuda' else CPU_VIEW_BACKEND
    return name


class MultiViewDataset(Dataset):
    """Each item is (pixels, label): `n_views` augmented copies of one image as PIL made them, uint8
    (n, s, s, 3); `batch_views` turns a collated batch into normalized float views (B, n, 3, s, s) on the
    device (collating and copying uint8 moves a quarter of the bytes of float views).

    Random views draw from torch's global generator (the official behaviour), so a seeded run repeats
    them. With `view_seed` set, the views of item i are drawn from the seed (view_seed, i) instead,
    whatever the order, batching or worker that loads it: the same image always gets the same views,
    which is what lets extracted features be pooled and cached. With `fixed_rotations` the views are
    rotated by i * 360 / n_views degrees.

    Each image is decoded and resized once per item rather than once per view (the resize is
    deterministic, so the views are the same tensors as the official per-view Compose). With
    `keep_images`, the resized image is kept in memory (img_size^2 x 3 bytes per image) and later epochs
    skip decoding (docs/performance.md). Workers each keep their own copy, so it only pays off with
    persistent workers or none.

    backend 'tensor': an item is (recipe, label) instead, the recipe holding the item's index and the
    random parameters of its views (angles, ColorJitter order and factors), drawn from the same stream
    in the same order as the PIL transforms draw them; `make_views` turns a collated batch of recipes
    into views with tensor operations on the device, from every image decoded and resized once (with
    the same PIL Resize) and kept as uint8. The views equal the PIL path's (docs/gpu.md).
    """

    def __init__(self, samples, n_views, config, fixed_rotations=False, view_seed=None, keep_images=False,
                 backend='pil', images=None):
        if backend not in ('pil', 'tensor'):
            raise ValueError(f"backend must be 'pil' or 'tensor', got {backend!r}")
        self.samples = list(samples)
        self.decoded = images  # per sample an RGB PIL image in memory to use instead of its file, or None
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
            self.view_transforms = [pil_view_transform(config, angle) for angle in self.angles]
        else:
            self.view_transforms = [pil_view_transform(config)] * n_views

    def __len__(self):
        return len(self.samples)

    def resized_image(self, index):
        if self.kept_images is not None and index in self.kept_images:
            return self.kept_images[index]
        in_memory = self.decoded[index] if self.decoded is not None else None
        image = self.resize(in_memory if in_memory is not None else load_rgb(self.samples[index].path))
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
            pixels = np.stack([np.asarray(transform(image)) for transform in self.view_transforms])
        return torch.from_numpy(pixels), label

    def batch_views(self, batch, device):
        """The normalized views (B, n_views, 3, s, s) on `device` of a loader batch."""
        views = self.batch_pixels(batch, device)
        if views.dtype == torch.uint8:
            return normalize_views(views, self.norm_mean, self.norm_std)
        return views

    def batch_pixels(self, batch, device):
        """The views (B, n_views, 3, s, s) of a loader batch on `device`, as late as they can be normalized:
        PIL-made pixels are copied (without blocking from pinned memory) and stay uint8 (channels-last
        strides), for `features.extract_view_features` to normalize each AlexNet pass's share while it is in
        cache; tensor-backend recipes are made into normalized float views on the device."""
        if self.backend == 'tensor':
            return self.make_views(batch, device)
        pixels = batch.to(device, non_blocking=batch.is_pinned())
        return pixels.permute(0, 1, 4, 2, 3)

    def views_of(self, index, device):
        """The views (n_views, 3, s, s) of item `index` on `device`, contiguous, from either backend."""
        item, _ = self[index]
        return self.batch_views(torch.utils.data.default_collate([item]), device)[0].contiguous()

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
        return normalize_views(views, self.norm_mean, self.norm_std).view(count, n_views, 3, size, size)

    @property
    def labels(self):
        return np.array([sample.label for sample in self.samples])
