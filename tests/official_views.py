"""The official code's view pipeline, one Compose per view: what the tests compare the dataset's views with."""
import torch
from torchvision import transforms

from utils import augment_transform, resize_transform


def view_transform(config, rotation_angle=None):
    """PIL image -> normalized tensor, as the official code: Resize((s, s)) on the PIL image, then
    RandomRotation(180) (or the fixed `rotation_angle`), optional ColorJitter, ToTensor, Normalize."""
    return transforms.Compose([resize_transform(config), augment_transform(config, rotation_angle)])


def views_of(dataset, index, device):
    """The views (n_views, 3, s, s) of item `index` of a MultiViewDataset on `device`, from either backend."""
    item, _ = dataset[index]
    if dataset.backend == 'pil':
        return item.to(device)
    return dataset.make_views(torch.utils.data.default_collate([item]), device)[0]
