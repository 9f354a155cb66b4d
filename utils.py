"""From images to views to loaders, as the official code's data module does: each image (decoded and resized
once) becomes n augmented views (`MultiViewDataset`: random or fixed rotations, optional colour jitter, the
ImageNet normalization), made by PIL one by one or as tensors in batches (the same pixels), and DataLoaders
of them. The images of a class are found by image_data/layouts.py.
"""
import contextlib
import logging
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF
from tqdm import tqdm

from image_data.image_files import load_rgb
from image_data.tensor_views import jitter_like_pil, pil_to_uint8, place_images, rotate_nearest

logger = logging.getLogger(__name__)

CPU_VIEW_BACKEND = 'pil'  # what view_backend 'auto' means on a CPU: the faster backend there (docs/gpu.md)


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


def view_backend(name, device):
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
        strides), for `model.view_features` to normalize each AlexNet pass's share while it is in
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


def dataset_loader(dataset, batch_size, shuffle, num_workers, device):
    """A DataLoader of a MultiViewDataset, with `num_workers` worker processes where they can start here;
    batches of views are pinned when they go to a CUDA `device`. The tensor backend loads in the main
    process: its items are a few random numbers, the views are made on the device from the kept images."""
    num_workers = usable_num_workers(dataset, num_workers)
    makes_views_on_device = dataset.backend == 'tensor'
    pin_memory = torch.device(device).type == 'cuda' and not makes_views_on_device
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=pin_memory)


def usable_num_workers(dataset, num_workers):
    """`num_workers`, or 0 with a warning when worker processes cannot start here."""
    if num_workers == 0 or dataset.backend == 'tensor':
        return 0
    try:
        with torch.random.fork_rng(devices=[]):  # the probe must not move the run's random stream
            next(iter(DataLoader(torch.utils.data.Subset(dataset, [0]), num_workers=num_workers)))
        return num_workers
    except Exception as error:
        logger.warning(f'warning: DataLoader workers failed ({type(error).__name__}: {str(error)[:100]}); '
                       f'loading images in the main process instead (num_workers = 0)')
        return 0


def progress(iterable, hide_bar, description, total=None):
    """A tqdm bar unless `hide_bar` (hide_tqdm_bar); in a log file (not a terminal) it redraws at most every
    30 s, so it cannot flood the file."""
    interval = 0.5 if sys.stderr.isatty() else 30
    return tqdm(iterable, desc=description, total=total, disable=hide_bar, leave=False,
                mininterval=interval, maxinterval=max(interval, 10), dynamic_ncols=True)
