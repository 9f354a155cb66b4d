"""Datasets: labels, defect types, views, and the one-line errors for bad trees."""
import os

import numpy as np
import pytest
import torch
from official_views import view_transform
from PIL import Image

from conftest import tiny_config, write_image
from image_data.demo_data import ensure_demo_dataset
from base.errors import UserError
from model import view_features
from model import DifferNet
from utils import MultiViewDataset, fixed_angles
from image_data.image_files import Sample, load_rgb
from image_data.layouts import find_class_samples, scan_class


def test_labels_and_defect_types(official_tree):
    train, test = find_class_samples(str(official_tree), 'widget')
    assert [sample.label for sample in train] == [0, 0, 0]
    by_type = {}
    for path, label, defect_type, _ in test:
        by_type.setdefault(defect_type, set()).add(label)
        assert os.path.basename(os.path.dirname(path)) == defect_type
    assert by_type == {'good': {0}, 'scratch': {1}, 'dent': {1}}
    assert len(test) == 5


def test_any_pillow_extension_and_hidden_files_ignored(official_tree):
    folder = official_tree / 'widget' / 'train' / 'good'
    write_image(str(folder / 'extra.bmp'))
    write_image(str(folder / 'extra.JPG'))
    (folder / '.directory').write_text('[Dolphin]')
    train, _ = find_class_samples(str(official_tree), 'widget')
    names = sorted(os.path.basename(path) for path, *_ in train)
    assert names == ['000.png', '001.png', '002.png', 'extra.JPG', 'extra.bmp']


def test_views_shape_and_normalization(official_tree):
    config = tiny_config()
    train, _ = find_class_samples(str(official_tree), 'widget')
    dataset = MultiViewDataset(train, 3, config)
    pixels, label = dataset[0]
    assert pixels.shape == (3, 64, 64, 3) and pixels.dtype == torch.uint8 and label == 0
    views = dataset.views_of(0, torch.device('cpu'))
    assert views.shape == (3, 3, 64, 64) and views.dtype == torch.float32
    assert -2.2 < float(views.min()) and float(views.max()) < 2.7  # (x / 255 - mean) / std


def test_random_views_follow_torch_seed(official_tree):
    config = tiny_config()
    path = str(official_tree / 'widget' / 'train' / 'good' / '000.png')
    write_image(path, size=(40, 30))  # non-square: rotations change pixels
    dataset = MultiViewDataset([Sample(path, 0, 'good')], 4, config)
    torch.manual_seed(7)
    first = dataset[0][0]
    torch.manual_seed(7)
    assert torch.equal(first, dataset[0][0])
    assert not torch.equal(first[0], first[1])


def test_kept_images_give_the_views_of_the_official_per_view_transform(official_tree):
    """Resizing once per image (and keeping it between epochs) must give exactly the views, and use
    exactly the random numbers, of the official Compose applied to the decoded image once per view."""
    config = tiny_config(transf_rotations=True)
    folder = official_tree / 'widget' / 'train' / 'good'
    samples = []
    for i, size in enumerate([(90, 70), (33, 120)]):  # resized to 64x64: the resize is not the identity
        path = str(folder / f'odd{i}.png')
        pixels = np.random.RandomState(i).randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        samples.append(Sample(path, 0, 'good'))
    official = view_transform(config)
    torch.manual_seed(3)
    expected = [torch.stack([official(load_rgb(sample.path)) for _ in range(4)]) for sample in samples * 2]
    after_official = torch.rand(1)
    dataset = MultiViewDataset(samples, 4, config, keep_images=True)
    torch.manual_seed(3)
    got = [dataset.views_of(i % 2, torch.device('cpu')) for i in range(4)]  # the second pass reads kept images
    assert len(dataset.kept_images) == 2
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(1), after_official)
    assert not torch.equal(got[0], got[2])  # new random rotations, not kept views


@pytest.mark.parametrize('channels_last', [True, False])
def test_uint8_views_normalized_per_alexnet_pass_give_the_features_of_normalized_views(official_tree,
                                                                                      channels_last):
    config = tiny_config(transf_rotations=True, channels_last=channels_last, extract_batch_size=4)
    train, _ = find_class_samples(str(official_tree), 'widget')
    dataset = MultiViewDataset(train, 3, config, view_seed=5)
    batch = torch.utils.data.default_collate([dataset[i][0] for i in range(len(dataset))])
    pixels = dataset.batch_pixels(batch, torch.device('cpu'))
    views = dataset.batch_views(batch, torch.device('cpu'))
    assert pixels.dtype == torch.uint8 and views.dtype == torch.float32 and pixels.shape == views.shape
    torch.manual_seed(0)
    model = DifferNet(config).eval()
    model.prepare(config, 'cpu')
    from_pixels = view_features(model, pixels.reshape(-1, *pixels.shape[2:]), (config.norm_mean, config.norm_std))
    from_views = view_features(model, views.reshape(-1, *views.shape[2:]), (config.norm_mean, config.norm_std))
    assert torch.equal(from_pixels, from_views)


def test_fixed_rotations_are_evenly_spaced(official_tree):
    assert fixed_angles(4) == [0.0, 90.0, 180.0, 270.0]
    config = tiny_config()
    train, _ = find_class_samples(str(official_tree), 'widget')
    dataset = MultiViewDataset(train, 4, config, fixed_rotations=True)
    torch.manual_seed(0)
    a = dataset[0][0]
    torch.manual_seed(1)
    assert torch.equal(a, dataset[0][0])


@pytest.mark.parametrize('remove, message', [
    ('widget/train/good', 'missing folder'),
    ('widget/test/good', 'missing folder'),
])
def test_missing_folders(official_tree, remove, message):
    import shutil
    shutil.rmtree(official_tree / remove)
    with pytest.raises(UserError, match=message):
        find_class_samples(str(official_tree), 'widget')


def test_empty_folder(official_tree):
    folder = official_tree / 'widget' / 'train' / 'good'
    for name in os.listdir(folder):
        os.remove(folder / name)
    with pytest.raises(UserError, match='no images in .*train.good'):
        find_class_samples(str(official_tree), 'widget')


def test_unknown_class_suggests_close_names(official_tree):
    with pytest.raises(UserError, match='did you mean widget'):
        find_class_samples(str(official_tree), 'widgit')
    with pytest.raises(UserError, match='does not exist'):
        find_class_samples(str(official_tree / 'nowhere'), 'widget')


def test_unreadable_image_named(official_tree):
    bad = official_tree / 'widget' / 'test' / 'dent' / 'broken.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\nnot really')
    train, test = find_class_samples(str(official_tree), 'widget')
    with pytest.raises(UserError, match='broken.png'):
        scan_class(str(official_tree), 'widget', train, test)


def test_demo_dataset_is_deterministic(tmp_path):
    assert ensure_demo_dataset(str(tmp_path / 'a'))
    assert not ensure_demo_dataset(str(tmp_path / 'a'))
    ensure_demo_dataset(str(tmp_path / 'b'))
    train, test = find_class_samples(str(tmp_path / 'a'), 'demo_washer')
    assert len(train) == 6 and len(test) == 9 and sum(sample.label for sample in test) == 6
    for path, *_ in train + test:
        twin = path.replace(str(tmp_path / 'a'), str(tmp_path / 'b'))
        with open(path, 'rb') as one, open(twin, 'rb') as two:
            assert one.read() == two.read()
