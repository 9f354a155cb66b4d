"""Image files on disk: which names are images Pillow reads, the images of a folder, `Sample` (one image of a
class with its label, defect type and mask), and decoding them: checked, as RGB, masks as booleans."""
import os
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image

from base.errors import UserError


def image_extensions():
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def is_image_name(name, extensions):
    """Whether a file name is an image Pillow reads (by its extension) and not a hidden file."""
    return not name.startswith('.') and os.path.splitext(name)[1].lower() in extensions


def list_images(folder):
    """Sorted paths of the image files directly in `folder` (by extension Pillow knows)."""
    extensions = image_extensions()
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if is_image_name(name, extensions) and os.path.isfile(os.path.join(folder, name)))


class Sample(NamedTuple):
    """One image: its path, label (0 normal, 1 anomalous), defect type (folder name) and mask, if any."""
    path: str
    label: int
    defect_type: str
    mask_path: Optional[str] = None


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
