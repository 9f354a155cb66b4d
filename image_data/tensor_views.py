"""Views made from uint8 image tensors in batches, pixel for pixel as PIL makes them one by one.

utils.MultiViewDataset's tensor backend: PIL's nearest rotation in its own 16.16 fixed point, ColorJitter
as torchvision applies it to PIL images, and where the kept images live.
"""
import math

import numpy as np
import torch

ROTATION_CHUNK = 32  # views rotated at a time: their coordinates take ~40 MB at 448 px
DEVICE_IMAGE_SHARE = 0.25  # kept images go onto the GPU when they take less than this share of its free memory


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
