"""The official code's view pipeline, one Compose per view: what the tests compare the dataset's views with."""
from torchvision import transforms

from utils import pil_view_transform, resize_transform


def view_transform(config, rotation_angle=None):
    """PIL image -> normalized tensor, as the official code: Resize((s, s)) on the PIL image, then
    RandomRotation(180) (or the fixed `rotation_angle`), optional ColorJitter, ToTensor, Normalize."""
    return transforms.Compose([resize_transform(config), pil_view_transform(config, rotation_angle),
                               transforms.ToTensor(), transforms.Normalize(config.norm_mean, config.norm_std)])
