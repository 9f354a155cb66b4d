"""Image files on disk: which names are images Pillow reads, the images of a folder, and `Sample`, one
image of a class with its label, defect type and mask."""
import os
from typing import NamedTuple, Optional

from PIL import Image


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
