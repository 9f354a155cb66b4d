"""Gradient maps, pixel metrics, checkpoints and scoring new images: tiny CPU cases with known answers."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from base.exact_metrics import aupro_exact, pixel_auroc_exact
from official_views import view_transform
from PIL import Image

from conftest import DATA_DIR, tiny_config
from base.errors import UserError
from localization import BLUR_SIGMA, combine_views, gaussian_blur, gradient_map, localize_class, rotate_back
from main import main
from base.metrics import pixel_auroc, pixel_metrics, upsample_map
from base.thresholds import threshold_at_fpr
from image_data.image_files import Sample, load_mask
from image_data.layouts import find_class_samples, split_validation
from model import DifferNet, fixed_rotation_features, load_checkpoint, score_view_features

TINY_RUN = ['--pretrained', 'false', '--img_size', '64', '--n_scales', '1', '--fc_internal', '16',
            '--n_coupling_blocks', '2', '--meta_epochs', '2', '--sub_epochs', '1', '--n_transforms', '2',
            '--n_transforms_test', '4', '--batch_size', '4', '--batch_size_test', '2', '--device', 'cpu',
            '--verbose', 'false', '--adam_fused', 'false', '--feature_cache', 'false']


def write_noise_image(path, seed, size=48):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.RandomState(seed).randint(0, 255, size=(size, size, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope='module')
def masked_tree(tmp_path_factory):
    """<root>/part/{train/good: 4, test/good: 2, test/hole: 2 with masks, test/stain: 1 without}."""
    root = tmp_path_factory.mktemp('data')
    seed = 0
    for folder, count in {'train/good': 4, 'test/good': 2, 'test/hole': 2, 'test/stain': 1}.items():
        for i in range(count):
            seed += 1
            write_noise_image(str(root / 'part' / folder / f'{i:03d}.png'), seed)
    for i in range(2):
        mask = np.zeros((48, 48), dtype=np.uint8)
        mask[10:20, 12 + i:24] = 255
        os.makedirs(root / 'part' / 'ground_truth' / 'hole', exist_ok=True)
        Image.fromarray(mask).save(root / 'part' / 'ground_truth' / 'hole' / f'{i:03d}_mask.png')
    return root


@pytest.fixture(scope='module')
def trained_run(masked_tree, tmp_path_factory):
    """One tiny run with fixed test rotations (so its test scores are checkpoint scores), best and
    final checkpoints, and gradient maps."""
    out = tmp_path_factory.mktemp('run')
    code = main(['--dataset_path', str(masked_tree), '--class_name', 'part', '--results_dir', str(out),
                 '--fixed_test_rotations', 'true', '--save_best', 'true', '--grad_map_viz', 'true', *TINY_RUN])
    assert code == 0
    with open(out / 'results.json') as handle:
        return out, json.load(handle)['classes'][0]


# --- the maps --------------------------------------------------------------------------------------

def spot_view(angle, spot=(10, 20), size=64):
    """The view (3, s, s) of a black image with one white pixel at `spot`, rotated by `angle` as
    utils.view_transform does (normalisation off)."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[spot] = 255
    config = tiny_config(img_size=size, norm_mean=(0.0, 0.0, 0.0), norm_std=(1.0, 1.0, 1.0))
    return view_transform(config, angle)(Image.fromarray(pixels))


@pytest.mark.parametrize('angle', [90.0, 180.0, 270.0])
def test_rotate_back_puts_a_spot_where_it_was(angle):
    view = spot_view(angle)
    assert view[0, 10, 20] == 0  # the view really moved it
    back = rotate_back(view[None], [angle])[0, 0]
    assert back[10, 20] == pytest.approx(1.0, abs=1e-5)
    assert back.sum() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize('angle', [37.0, 200.0])
def test_rotate_back_at_any_angle_lands_within_a_pixel(angle):
    back = rotate_back(spot_view(angle)[None], [angle])[0, 0]
    rows, cols = np.mgrid[0:64, 0:64]
    centre = (float((back * rows).sum() / back.sum()), float((back * cols).sum() / back.sum()))
    assert abs(centre[0] - 10) < 1.0 and abs(centre[1] - 20) < 1.0


def official_map(gradients, angles):
    """The official export_gradient_maps steps for one image, written out as that code does them: each
    view's (C, s, s) gradient moved to (s, s, C), scipy.ndimage.rotate by -angle with only
    reshape=False given, back to (C, s, s), gaussian_filter with sigma (0, 3, 3) and nothing else; then
    mean of |g| over views and channels, squared."""
    from scipy.ndimage import gaussian_filter, rotate
    blurred = []
    for view_gradient, angle in zip(gradients, angles):
        turned = np.transpose(rotate(np.transpose(view_gradient, [1, 2, 0]), -angle, reshape=False), [2, 0, 1])
        blurred.append(gaussian_filter(turned, (0, 3, 3)))
    return np.mean(np.abs(np.stack(blurred)), axis=(0, 1)) ** 2


def test_map_operations_are_the_official_calls():
    gradients = np.random.RandomState(0).standard_normal((5, 3, 40, 40)).astype(np.float32)
    angles = [0.0, 72.0, 144.0, 216.0, 288.0]
    ours = combine_views(gaussian_blur(rotate_back(torch.from_numpy(gradients), angles)))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, official_map(gradients, angles), rtol=1e-5, atol=0)


def test_blur_borders_repeat_the_edge_pixel():
    """'reflect' (d c b a | a b c d): a bright first column meets its own copy across the border, so the
    border pixel keeps the kernel's two central taps; 'mirror' (d c b | a b c d) would keep one."""
    image = np.zeros((1, 1, 60, 60))
    image[..., 0] = 1.0
    offsets = np.arange(-12, 13)  # radius 4 sigma
    taps = np.exp(-offsets ** 2 / (2 * BLUR_SIGMA ** 2))
    taps /= taps.sum()
    blurred = gaussian_blur(image)[0, 0]
    np.testing.assert_allclose(blurred[:, 0], taps[12] + taps[13], rtol=1e-6)
    np.testing.assert_allclose(blurred[:, 2], taps[10] + taps[15], rtol=1e-6)
    np.testing.assert_allclose(blurred.sum(axis=1), 1.0, rtol=1e-6)  # nothing leaks out at the borders


def test_rotate_back_is_a_cubic_spline():
    """A smooth pattern turned by 45 degrees (5th-order spline, nearly exact) comes back within 1e-4 with
    the official cubic spline, where bilinear interpolation is off by ~7e-3; a 90-degree turn moves
    pixels exactly."""
    from scipy.ndimage import rotate
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    rows, cols = np.mgrid[0:64, 0:64] - 31.5
    smooth = (np.cos(rows / 5.0) * np.sin(cols / 7.0) * np.exp(-(rows ** 2 + cols ** 2) / 600)).astype(np.float32)
    turned = rotate(smooth, 45.0, reshape=False, order=5)[None]  # as the view rotation turns it
    centre = (slice(16, 48), slice(16, 48))  # away from the corners that leave the frame
    cubic_error = np.abs(rotate_back(turned[None], [45.0])[0, 0] - smooth)[centre].max()
    bilinear_error = np.abs(TF.rotate(torch.from_numpy(turned), -45.0, interpolation=InterpolationMode.BILINEAR)[0]
                            .numpy() - smooth)[centre].max()
    assert cubic_error < 1e-4 and bilinear_error > 1e-3
    noise = np.random.RandomState(1).standard_normal((1, 1, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(rotate_back(noise, [90.0])[0, 0], np.rot90(noise[0, 0], k=-1), atol=1e-5)


def test_map_of_rotated_image_is_rotated_map(tmp_path):
    """With views every 90 degrees, rotating the image permutes its views: a correct rotation back makes
    the map turn with the image."""
    torch.manual_seed(0)
    config = tiny_config(n_transforms_test=4)
    model = DifferNet(config)
    write_noise_image(str(tmp_path / 'a.png'), 7, size=64)
    Image.open(tmp_path / 'a.png').rotate(90).save(tmp_path / 'b.png')
    heat, score = gradient_map(model, str(tmp_path / 'a.png'), config, torch.device('cpu'))
    heat_rotated, score_rotated = gradient_map(model, str(tmp_path / 'b.png'), config, torch.device('cpu'))
    assert heat.shape == (64, 64) and (heat >= 0).all() and heat.max() > 0
    assert score_rotated == pytest.approx(score, rel=1e-5)
    np.testing.assert_allclose(heat_rotated, np.rot90(heat), rtol=1e-3, atol=1e-6 * heat.max())
    assert not np.allclose(heat_rotated, heat, rtol=1e-3, atol=1e-6 * heat.max())


# --- pixel metrics ---------------------------------------------------------------------------------

@pytest.mark.parametrize('pixel_auroc', [pixel_auroc, pixel_auroc_exact], ids=['binned', 'exact'])
def test_pixel_auroc_known_cases(pixel_auroc):
    mask = np.zeros((4, 4), dtype=bool)
    mask[:, 2:] = True
    columns = np.tile(np.arange(4.0), (4, 1))
    assert pixel_auroc([columns], [mask]) == 1.0
    assert pixel_auroc([-columns], [mask]) == 0.0
    # positives score 0.5 and 2.5, negatives 1, 2, 3: 2 of the 6 pairs are ordered right
    assert pixel_auroc([np.array([[0.5, 1, 2, 2.5, 3]])], [np.array([[1, 0, 0, 1, 0]], dtype=bool)]) == \
        pytest.approx(1 / 3)
    # a 2x2 map upsampled bilinearly to the 4x4 mask: columns 0, 0.25, 0.75, 1
    small = np.array([[0.0, 1.0], [0.0, 1.0]])
    np.testing.assert_allclose(upsample_map(small, (4, 4))[0], [0, 0.25, 0.75, 1])
    assert pixel_auroc([small], [mask]) == 1.0
    middle = np.zeros((4, 4), dtype=bool)
    middle[:, 1:3] = True
    assert pixel_auroc([small], [middle]) == pytest.approx(0.5)
    assert np.isnan(pixel_auroc([small], [np.zeros((4, 4), dtype=bool)]))


def binned_aupro(maps, masks):
    return pixel_metrics(maps, masks)['aupro']


@pytest.mark.parametrize('aupro', [binned_aupro, aupro_exact], ids=['binned', 'exact'])
def test_aupro_known_cases(aupro):
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = True          # region A: 1 pixel
    mask[4:6, 4] = True        # region B: 2 pixels
    perfect = mask.astype(float)
    assert aupro([perfect], [mask]) == pytest.approx(1.0)
    # A above every defect-free pixel, B below all of them: PRO stays 0.5 up to FPR 1
    half = np.full((6, 6), 0.5)
    half[0, 0], half[4:6, 4] = 1.0, 0.0
    assert aupro([half], [mask]) == pytest.approx(0.5)
    assert np.isnan(aupro([perfect], [np.zeros((6, 6), dtype=bool)]))
    # a diagonal neighbour joins the region (8-connected): (2, 2) found alone covers 1/3 of one region
    # (4-connected it would be all of {(2, 2)} and none of {(3, 3), (3, 4)}: 0.5)
    diagonal = np.zeros((6, 6), dtype=bool)
    diagonal[2, 2] = diagonal[3, 3] = diagonal[3, 4] = True
    found_one = np.where(diagonal, -1.0, 0.0)
    found_one[2, 2] = 1.0
    assert aupro([found_one], [diagonal]) == pytest.approx(1 / 3)


def random_maps_and_masks(seed, n_images=12):
    """Maps of 24 x 24 whose values span orders of magnitude from image to image (as real gradient maps
    do), brighter where their 48 x 48 mask has blobs; a third of the masks empty."""
    rng = np.random.RandomState(seed)
    maps, masks = [], []
    for i in range(n_images):
        mask = np.zeros((48, 48), dtype=bool)
        if i % 3:
            for _ in range(rng.randint(1, 4)):
                row, col, radius = rng.randint(4, 44), rng.randint(4, 44), rng.randint(1, 6)
                rows, cols = np.ogrid[:48, :48]
                mask |= (rows - row) ** 2 + (cols - col) ** 2 <= radius ** 2
        small = mask.reshape(24, 2, 24, 2).mean(axis=(1, 3))
        maps.append((rng.lognormal(0, 1, (24, 24)) + 3 * small) * 10.0 ** rng.uniform(-3, 6))
        masks.append(mask)
    return maps, masks


@pytest.mark.parametrize('n_bins', [16384, 64])
@pytest.mark.parametrize('seed', [0, 1])
def test_binned_metrics_are_within_their_bounds_of_the_exact_ones(seed, n_bins):
    maps, masks = random_maps_and_masks(seed)
    metrics = pixel_metrics(maps, iter(masks), n_bins=n_bins)  # masks read once, as from a generator
    exact_auroc, exact_aupro = pixel_auroc_exact(maps, masks), aupro_exact(maps, masks)
    assert 0.5 < exact_auroc < 1 and 0 < exact_aupro < 1
    assert abs(metrics['pixel_auroc'] - exact_auroc) <= metrics['pixel_auroc_max_error'] + 1e-12
    assert abs(metrics['aupro'] - exact_aupro) <= metrics['aupro_max_error'] + 1e-12
    if n_bins == 16384:  # equal-count bins: ~1 / (2 n_bins) despite the spread of scales
        assert metrics['pixel_auroc_max_error'] < 1e-3 and metrics['aupro_max_error'] < 1e-3
    else:  # the bound is not vacuous: coarse bins do move the result
        assert metrics['pixel_auroc'] != exact_auroc and metrics['pixel_auroc_max_error'] > 1e-3


def test_binned_metrics_on_bottle_masks():
    """Real bottle masks (900 x 900) with maps at 448 x 448 that follow the defects loosely."""
    bottle = os.path.join(DATA_DIR, 'mvtec', 'bottle')
    if not os.path.isdir(os.path.join(bottle, 'ground_truth')):
        pytest.skip(f'no MVTec AD bottle under {DATA_DIR} (set DIFFERNET_DATA)')
    from scipy.ndimage import gaussian_filter
    rng = np.random.RandomState(0)
    maps, masks = [], []
    for defect_type in ['broken_large', 'contamination']:
        for name in sorted(os.listdir(os.path.join(bottle, 'ground_truth', defect_type)))[:3]:
            mask = load_mask(os.path.join(bottle, 'ground_truth', defect_type, name))
            small = np.asarray(Image.fromarray(mask).resize((448, 448), Image.BILINEAR), dtype=np.float64)
            maps.append(gaussian_filter(small + rng.standard_normal((448, 448)) * 2.0, 6) ** 2)
            masks.append(mask)
    maps.append(gaussian_filter(rng.standard_normal((448, 448)) * 2.0, 6) ** 2)
    masks.append(np.zeros((900, 900), dtype=bool))
    metrics = pixel_metrics(maps, iter(masks))
    assert abs(metrics['pixel_auroc'] - pixel_auroc_exact(maps, masks)) <= metrics['pixel_auroc_max_error'] < 1e-4
    assert abs(metrics['aupro'] - aupro_exact(maps, masks)) <= metrics['aupro_max_error'] < 1e-3


def test_masks_come_with_the_samples(masked_tree):
    _, test_samples = find_class_samples(str(masked_tree), 'part')
    masks = {(s.defect_type, os.path.basename(s.path)): s.mask_path for s in test_samples}
    assert masks[('hole', '001.png')] == str(masked_tree / 'part' / 'ground_truth' / 'hole' / '001_mask.png')
    assert masks[('stain', '000.png')] is None and masks[('good', '000.png')] is None


def test_localize_class_writes_pngs_and_scores_pixels(masked_tree, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(n_transforms_test=2)
    _, test_samples = find_class_samples(str(masked_tree), 'part')
    result = localize_class(DifferNet(config), test_samples, config, torch.device('cpu'), str(tmp_path / 'maps'))
    assert sorted(os.listdir(tmp_path / 'maps')) == ['hole_000.png', 'hole_001.png', 'stain_000.png']
    assert result['n_pixel_metric_images'] == 4  # 2 good + 2 holes; the stain has no mask
    assert 0 <= result['pixel_auroc'] <= 1 and 0 <= result['aupro'] <= 1
    assert set(result['pixel_auroc_per_defect_type']) == {'hole'}
    assert result['pixel_auroc_per_defect_type']['hole'] == result['pixel_auroc']


# --- checkpoints and scoring ---------------------------------------------------------------------------

def test_run_saves_checkpoints_and_maps(trained_run):
    out, entry = trained_run
    assert os.path.isfile(out / 'part_checkpoint.pt') and os.path.isfile(out / 'part_best.pt')
    assert entry['checkpoint'] == 'part_checkpoint.pt'  # relative to the results folder
    assert len(os.listdir(out / 'maps' / 'part')) == 3
    assert 0 <= entry['pixel_auroc'] <= 1 and set(entry['pixel_auroc_per_defect_type']) == {'hole'}


def test_checkpoint_round_trip_gives_the_run_scores(trained_run, masked_tree):
    out, entry = trained_run
    model, checkpoint = load_checkpoint(str(out / 'part_checkpoint.pt'), tiny_config(img_size=448))
    assert model.img_size == 64 and checkpoint['settings']['n_transforms_test'] == 4
    assert checkpoint['history']['auroc'] == entry['auroc']
    train_samples, test_samples = find_class_samples(str(masked_tree), 'part')
    settings = tiny_config(**checkpoint['settings'], feature_cache=False)
    model.prepare(settings, torch.device('cpu')).eval()
    features = fixed_rotation_features(model, test_samples, settings, torch.device('cpu'), 'test')
    assert score_view_features(model, features, settings.batch_size_test)[0].tolist() == entry['test_scores']
    training = checkpoint['reference_scores']['training']
    assert training['n'] == 4 and checkpoint['reference_scores']['validation'] is None
    features = fixed_rotation_features(model, train_samples, settings, torch.device('cpu'), 'train')
    assert score_view_features(model, features, settings.batch_size_test)[0].tolist() == training['scores']
    assert training['mean'] == pytest.approx(np.mean(training['scores']))
    assert training['quantiles']['1.0'] == max(training['scores'])


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_scoring_a_folder_with_a_threshold(trained_run, masked_tree, tmp_path, capsys):
    out, entry = trained_run
    test_scores = sorted(entry['test_scores'])
    threshold = (test_scores[2] + test_scores[3]) / 2  # 3 images below, 2 above
    csv_path = tmp_path / 'scores.csv'
    code = main(['--score', str(masked_tree / 'part' / 'test'), '--checkpoint', str(out / 'part_checkpoint.pt'),
                 '--threshold', str(threshold), '--score_out', str(csv_path), '--device', 'cpu',
                 '--maps', str(tmp_path / 'maps')])
    assert code == 0
    printed = capsys.readouterr().out
    assert 'given with --threshold' in printed and '5 images, 2 anomalous' in printed
    rows = read_csv(csv_path)
    assert [os.path.relpath(r['file'], masked_tree / 'part' / 'test') for r in rows] == \
        ['good/000.png', 'good/001.png', 'hole/000.png', 'hole/001.png', 'stain/000.png']
    by_file = dict(zip(entry['test_files'], entry['test_scores']))  # files relative to the dataset path
    for row in rows:
        expected = by_file[os.path.relpath(row['file'], masked_tree)]
        assert float(row['raw_score']) == pytest.approx(expected, abs=1e-6)
        assert row['decision'] == ('anomalous' if expected > threshold else 'good')
        assert 0 <= float(row['score']) <= 1 and (float(row['score']) > 0.5) == (row['decision'] == 'anomalous')
    by_raw = sorted(rows, key=lambda row: float(row['raw_score']))
    assert [float(row['score']) for row in by_raw] == sorted(float(row['score']) for row in rows)  # monotone
    assert sorted(os.listdir(tmp_path / 'maps')) == [
        'good__000_map.png', 'good__001_map.png', 'hole__000_map.png', 'hole__001_map.png', 'stain__000_map.png']


def test_default_threshold_comes_from_training_scores(trained_run, masked_tree, tmp_path, capsys):
    out, _ = trained_run
    code = main(['--score', str(masked_tree / 'part' / 'train'), '--checkpoint', str(out / 'part_checkpoint.pt'),
                 '--score_out', str(tmp_path / 's.csv'), '--device', 'cpu', '--threshold_fpr', '0'])
    assert code == 0
    assert "score at false-positive rate 0 on the 4 training images' own scores" in capsys.readouterr().out
    assert [row['decision'] for row in read_csv(tmp_path / 's.csv')] == ['good'] * 4  # threshold = their max


def test_settings_the_checkpoint_fixes_are_named_not_dropped_silently(trained_run, masked_tree, tmp_path, capsys):
    out, entry = trained_run
    code = main(['--score', str(masked_tree / 'part' / 'test'), '--checkpoint', str(out / 'part_checkpoint.pt'),
                 '--n_transforms_test', '2', '--img_size', '128', '--device', 'cpu',
                 '--score_out', str(tmp_path / 's.csv')])
    assert code == 0
    printed = capsys.readouterr().out
    assert 'the checkpoint fixes img_size 64 (asked: 128), n_transforms_test 4 (asked: 2)' in printed
    assert '(4 views each)' in printed
    by_file = dict(zip(entry['test_files'], entry['test_scores']))
    for row in read_csv(tmp_path / 's.csv'):  # scored with the checkpoint's values
        assert float(row['raw_score']) == pytest.approx(by_file[os.path.relpath(row['file'], masked_tree)], abs=1e-6)


def test_threshold_at_fpr():
    scores = np.arange(100.0)
    assert threshold_at_fpr(scores, 0.01) == 98.0   # only 99 exceeds it
    assert threshold_at_fpr(scores, 0.0) == 99.0
    assert threshold_at_fpr(scores, 0.1) == 89.0
    assert threshold_at_fpr([3.0], 0.5) == 3.0


def test_validation_share_is_held_out_and_used(masked_tree, tmp_path, capsys):
    train_samples, _ = find_class_samples(str(masked_tree), 'part')
    kept, held_out = split_validation(train_samples, 0.25, seed=0)
    assert len(held_out) == 1 and sorted(kept + held_out) == train_samples
    assert split_validation(train_samples[::-1], 0.25, seed=0) == (kept, held_out)
    with pytest.raises(UserError, match='val_fraction'):
        split_validation(train_samples, 0.9, seed=0)
    out = tmp_path / 'run'
    assert main(['--dataset_path', str(masked_tree), '--class_name', 'part', '--results_dir', str(out),
                 '--val_fraction', '0.25', *TINY_RUN]) == 0
    checkpoint = torch.load(out / 'part_checkpoint.pt', weights_only=True)
    validation = checkpoint['reference_scores']['validation']
    assert validation['files'] == [os.path.relpath(held_out[0][0], masked_tree)]
    assert checkpoint['reference_scores']['training']['n'] == 3
    assert validation['files'][0] not in checkpoint['reference_scores']['training']['files']
    capsys.readouterr()
    assert main(['--score', held_out[0][0], '--checkpoint', str(out / 'part_checkpoint.pt'), '--device', 'cpu',
                 '--score_out', str(tmp_path / 's.csv')]) == 0
    assert 'on the 1 held-out defect-free validation images' in capsys.readouterr().out


def official_state_dict(model):
    """What the official save_weights writes: the whole torchvision AlexNet under `feature_extractor.`
    (classifier included) and the flow under `nf.`, with the unused BatchNorm entries of each subnet."""
    import torchvision
    state = {f'feature_extractor.features.{k}': v.clone() for k, v in
             model.feature_extractor.features.state_dict().items()}
    state.update({f'feature_extractor.{k}': v for k, v in torchvision.models.alexnet(weights=None).state_dict().items()
                  if k.startswith('classifier.')})
    for key, value in model.nf.state_dict().items():
        state['nf.' + key] = value.clone()
        if key.endswith('fc1.weight'):
            bn = 'nf.' + key[:-len('fc1.weight')] + 'bn.'
            state.update({bn + 'weight': torch.ones(value.shape[1]), bn + 'bias': torch.zeros(value.shape[1]),
                          bn + 'running_mean': torch.zeros(value.shape[1]), bn + 'running_var': torch.ones(value.shape[1]),
                          bn + 'num_batches_tracked': torch.tensor(0)})
    return state


def test_official_state_dict_scores_the_same(masked_tree, tmp_path, capsys):
    torch.manual_seed(3)
    config = tiny_config(n_transforms_test=4, n_scales=2, img_size=128, n_coupling_blocks=3, fc_internal=24,
                         feature_cache=False)
    model = DifferNet(config).eval()
    path = tmp_path / 'official.pth'
    torch.save(official_state_dict(model), path)
    loaded, checkpoint = load_checkpoint(str(path), tiny_config(img_size=128))
    assert (checkpoint['settings']['n_scales'], checkpoint['settings']['n_coupling_blocks'],
            checkpoint['settings']['fc_internal']) == (2, 3, 24)
    _, test_samples = find_class_samples(str(masked_tree), 'part')
    cpu = torch.device('cpu')
    expected = score_view_features(model, fixed_rotation_features(model, test_samples, config, cpu, ''), config.batch_size_test)[0]
    got = score_view_features(loaded, fixed_rotation_features(loaded, test_samples, config, cpu, ''), config.batch_size_test)[0]
    assert got.tolist() == expected.tolist()
    capsys.readouterr()
    args = ['--score', str(masked_tree / 'part' / 'test'), '--checkpoint', str(path), '--img_size', '128',
            '--n_transforms_test', '4', '--device', 'cpu', '--score_out', str(tmp_path / 's.csv')]
    assert main(args) == 2  # no reference scores in an official file
    assert '--threshold' in capsys.readouterr().err
    assert main(args + ['--threshold', '1.0']) == 0
    assert [float(r['raw_score']) for r in read_csv(tmp_path / 's.csv')] == pytest.approx(expected.tolist(), abs=1e-6)


@pytest.mark.parametrize('make_args, message', [
    (lambda d: ['--score', str(d / 'ok.png'), '--checkpoint', str(d / 'missing.pt')], 'missing.pt does not exist'),
    (lambda d: ['--score', str(d / 'nothing'), '--checkpoint', str(d / 'c.pt')], 'does not exist'),
    (lambda d: ['--score', str(d / 'empty'), '--checkpoint', str(d / 'c.pt')], 'no images found'),
    (lambda d: ['--score', str(d / 'broken.png'), '--checkpoint', str(d / 'c.pt')], 'cannot read image'),
    (lambda d: ['--score', str(d / 'broken.png')], '--checkpoint FILE go together'),
    (lambda d: ['--score', str(d / 'ok.png'), '--checkpoint', str(d / 'broken.png')], 'cannot be read'),
])
def test_scoring_mistakes_are_one_line_errors(tmp_path, capsys, make_args, message):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'broken.png').write_bytes(b'not a png')
    write_noise_image(str(tmp_path / 'ok.png'), 0)
    assert main(make_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_chunked_input_gradients_equal_one_pass():
    from localization import input_gradients
    torch.manual_seed(0)
    model = DifferNet(tiny_config()).eval()
    views = torch.randn(6, 3, 64, 64)
    whole, score = input_gradients(model, views)
    chunked, chunked_score = input_gradients(model, views, chunk_size=4)
    assert torch.allclose(whole, chunked, rtol=1e-4, atol=1e-9)
    assert chunked_score == pytest.approx(score, rel=1e-5)


@pytest.mark.parametrize('bf16', [False, True], ids=['fp32', 'bf16'])
def test_a_gradient_map_scores_its_image_as_the_scorer_does(tmp_path, bf16):
    """One score under one precision: the map's pass through a bfloat16 model runs in bfloat16 too, and its
    score is the one `--score` gives the image (float32 maps of a bfloat16 model scored 4e-4 apart)."""
    write_noise_image(str(tmp_path / 'a.png'), 3, size=80)
    config = tiny_config(bf16_autocast=bf16, n_transforms_test=4, fc_internal=64, feature_cache=False)
    torch.manual_seed(0)
    model = DifferNet(config).prepare(config, 'cpu').eval()
    features = fixed_rotation_features(model, [Sample(str(tmp_path / 'a.png'), 0, '')], config, 'cpu', 'scored')
    scored = float(score_view_features(model, features, config.batch_size_test)[0][0])
    _, map_score = gradient_map(model, str(tmp_path / 'a.png'), config, torch.device('cpu'))
    assert map_score == pytest.approx(scored, rel=1e-6)
