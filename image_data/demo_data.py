"""The demo set: a few drawn metal washers, generated into data/demo on first use."""
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEMO_DATASET_PATH = os.path.join('data', 'demo')  # generated on first use; ignored by git
DEMO_CLASS = 'demo_washer'


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
