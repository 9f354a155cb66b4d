"""Views made in batches with tensor operations (view_backend 'tensor') equal the official PIL views,
and nothing assumes a CPU: the random streams, the resume state, the loss reads. Tests marked `cuda` run
where CUDA exists (benchmarks/gpu_check.py runs them) and are skipped with the reason elsewhere."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from conftest import DATA_DIR, REPO_ROOT, cuda, tiny_config
from base.errors import UserError
from model import seeded_view_features, view_features
from utils import dataset_loader
from model import DifferNet
from base.settings import validate_config
from image_data.tensor_views import pil_to_uint8, rotate_nearest
from train import loss_values, train_class
from utils import MultiViewDataset, view_backend
from image_data.layouts import find_class_samples

CPU = torch.device('cpu')
BOTTLE = os.path.join(DATA_DIR, 'mvtec', 'bottle')


def both_backends(samples, n_views, config, **options):
    return (MultiViewDataset(samples, n_views, config, **options),
            MultiViewDataset(samples, n_views, config, backend='tensor', **options))


def loader_views(dataset, device, shuffle, batch_size=2):
    """Every batch of views of a seeded loader pass, and the next number of the global stream after it."""
    torch.manual_seed(11)
    batches = [dataset.batch_views(batch, device).cpu()
               for batch, _ in dataset_loader(dataset, batch_size, shuffle, tiny_config(), device)]
    return batches, torch.rand(1).item()


def test_rotation_is_pils_nearest_rotation_pixel_for_pixel():
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (96, 96, 3)).astype(np.uint8))
    torch.manual_seed(0)
    angles = [0.0, 90.0, 180.0, 270.0, 45.0, 5.625, -0.001, 359.999] + torch.empty(40).uniform_(-180, 180).tolist()
    rotated = rotate_nearest(pil_to_uint8(image).unsqueeze(0).repeat(len(angles), 1, 1, 1), angles)
    for angle, got in zip(angles, rotated):
        assert torch.equal(got, pil_to_uint8(TF.rotate(image, angle))), angle


@pytest.mark.parametrize('jitter', [{}, dict(transf_brightness=0.3, transf_contrast=0.4, transf_saturation=0.5)])
def test_seeded_loader_gives_the_pil_views_and_leaves_the_global_stream_alike(demo_root, jitter):
    """Same global seed, shuffled loader: same order, same angles and jitter, same views, same stream after."""
    config = tiny_config(img_size=72, **jitter)
    samples, _ = find_class_samples(demo_root, 'demo_washer')
    pil, tensor = both_backends(samples, 3, config)
    pil_batches, pil_next = loader_views(pil, CPU, shuffle=True)
    tensor_batches, tensor_next = loader_views(tensor, CPU, shuffle=True)
    assert len(pil_batches) == len(tensor_batches) == 3
    for expected, got in zip(pil_batches, tensor_batches):
        assert torch.equal(expected, got)
    assert pil_next == tensor_next


@pytest.mark.parametrize('fixed_rotations', [False, True])
def test_view_seeded_and_fixed_rotation_views_equal_the_pil_ones(demo_root, fixed_rotations):
    config = tiny_config(img_size=64, transf_brightness=0.2)
    _, samples = find_class_samples(demo_root, 'demo_washer')
    pil, tensor = both_backends(samples, 8, config, view_seed=5, fixed_rotations=fixed_rotations)
    torch.manual_seed(1)  # the global stream must not matter with a view seed
    expected = torch.stack([pil.views_of(i, CPU) for i in range(len(pil))])
    torch.manual_seed(2)
    got = torch.stack([tensor.views_of(i, CPU) for i in range(len(tensor))])
    assert torch.equal(expected, got)


def test_recipe_angles_are_the_numbers_random_rotation_draws(demo_root):
    samples, _ = find_class_samples(demo_root, 'demo_washer')
    dataset = MultiViewDataset(samples, 5, tiny_config(), backend='tensor')
    torch.manual_seed(4)
    recipe, _ = dataset[0]
    torch.manual_seed(4)
    assert recipe['angles'].tolist() == [torch.empty(1).uniform_(-180.0, 180.0).item() for _ in range(5)]


def test_view_seed_reseeds_no_cuda_generator(demo_root, monkeypatch):
    """torch.manual_seed reseeds every CUDA generator, which fork_rng(devices=[]) does not restore."""
    def refuse(*args, **kwargs):
        raise AssertionError('a CUDA generator was reseeded')
    monkeypatch.setattr(torch.cuda, 'manual_seed_all', refuse)
    monkeypatch.setattr(torch.cuda, 'manual_seed', refuse)
    samples, _ = find_class_samples(demo_root, 'demo_washer')
    for backend in ('pil', 'tensor'):
        MultiViewDataset(samples, 2, tiny_config(), view_seed=3, backend=backend)[0]


def test_auto_backend_and_refused_names():
    assert view_backend('auto', torch.device('cuda')) == 'tensor'
    assert view_backend('pil', torch.device('cuda')) == 'pil'
    assert view_backend('auto', CPU) in ('pil', 'tensor')
    with pytest.raises(UserError, match="view_backend = 'opencv' must be auto, pil or tensor"):
        validate_config(tiny_config(view_backend='opencv'))


def test_loss_values_reads_tensors_and_floats_in_order():
    assert loss_values([torch.tensor(1.5), 2.0, torch.tensor(float('nan'))])[:2] == [1.5, 2.0]
    assert np.isnan(loss_values([torch.tensor(float('nan'))])[0])
    assert loss_values([]) == []


class StoppedAfterMetaEpoch0(Exception):
    pass


def stop_after_meta_epoch_0(meta_epoch, *rest):
    raise StoppedAfterMetaEpoch0  # called after the state of the meta epoch is written


def test_resume_state_is_loaded_onto_the_cpu(official_tree, tmp_path, monkeypatch):
    """On CUDA, map_location=device put the saved generator states on the GPU, and torch.set_rng_state
    refuses those: the state is loaded on the CPU, and load_state_dict moves the flow and Adam state."""
    config = tiny_config(meta_epochs=2, resume_interval_s=0, feature_cache=False)
    train_samples, test_samples = find_class_samples(str(official_tree), 'widget')
    resume_path = str(tmp_path / 'state.pt')
    torch.manual_seed(0)
    whole = train_class(DifferNet(config), train_samples, test_samples, config, CPU)
    torch.manual_seed(0)
    with pytest.raises(StoppedAfterMetaEpoch0):  # leaves the state after meta epoch 0
        train_class(DifferNet(config), train_samples, test_samples, config, CPU, on_meta_epoch=stop_after_meta_epoch_0,
                    resume_path=resume_path)
    locations, real_load = [], torch.load
    monkeypatch.setattr(torch, 'load',
                        lambda *args, **kwargs: locations.append(kwargs.get('map_location')) or real_load(*args, **kwargs))
    torch.manual_seed(0)
    resumed = train_class(DifferNet(config), train_samples, test_samples, config, CPU,
                          resume_path=resume_path)
    assert locations == ['cpu']
    assert resumed['test_scores'] == whole['test_scores']


# --- real bottle images: the two paths, pixels and features ------------------------------------------

@pytest.fixture(scope='module')
def bottle_images():
    if not os.path.isdir(BOTTLE):
        pytest.skip(f'MVTec AD bottle not found at {BOTTLE}')
    train_samples, test_samples = find_class_samples(os.path.dirname(BOTTLE), 'bottle')
    return train_samples[:6] + [s for s in test_samples if s.label][:4]


def test_bottle_views_pixels_match_pil(bottle_images):
    """Measured: 0 of 10 x 16 x 3 x 448^2 values differ (PIL's nearest rotation runs in 16.16 fixed
    point, which rotate_nearest reproduces). The bound leaves room for another Pillow's rounding."""
    config = build_bottle_config()
    pil, tensor = both_backends(bottle_images, 16, config, view_seed=9)
    expected = torch.stack([pil.views_of(i, CPU) for i in range(len(pil))])
    got = torch.stack([tensor.views_of(i, CPU) for i in range(len(tensor))])
    differing_pixels = (expected != got).any(dim=2).float().mean().item()
    assert differing_pixels <= 1e-4
    assert (expected - got).abs().max().item() <= 2.2  # at most one whole pixel swapped, in normalized units


def test_bottle_features_through_the_real_extractor_match_pil(bottle_images):
    """Measured: relative feature difference 0 (identical views). Bound 1e-4, room for another Pillow."""
    from base.alexnet_weights import load_imagenet_alexnet_features
    state, _ = load_imagenet_alexnet_features()
    config = build_bottle_config()
    model = DifferNet(config, state).eval()
    pil, tensor = both_backends(bottle_images[:4], 8, config, view_seed=9)
    expected = view_features(model, torch.cat([pil.views_of(i, CPU) for i in range(len(pil))]), (config.norm_mean, config.norm_std))
    got = view_features(model, torch.cat([tensor.views_of(i, CPU) for i in range(len(tensor))]), (config.norm_mean, config.norm_std))
    relative = ((expected - got).norm() / expected.norm()).item()
    assert relative <= 1e-4


def build_bottle_config():
    from base.settings import build_config
    return build_config(device='cpu', verbose=False, channels_last=False)


# --- CUDA: the same code with device = 'cuda' --------------------------------------------------------

@cuda
def test_cuda_views_equal_cpu_views(demo_root):
    config = tiny_config(img_size=96, transf_contrast=0.3)
    samples, _ = find_class_samples(demo_root, 'demo_washer')
    pil, tensor = both_backends(samples, 6, config)
    expected, expected_next = loader_views(pil, CPU, shuffle=True)
    got, got_next = loader_views(tensor, torch.device('cuda'), shuffle=True)
    pinned, _ = loader_views(MultiViewDataset(samples, 6, config), torch.device('cuda'), shuffle=True)
    for a, b, c in zip(expected, got, pinned):
        assert torch.allclose(a, b, atol=1e-6) and torch.equal(a, c)
    assert expected_next == got_next


@cuda
def test_cuda_generators_untouched_by_view_seeds_and_fixed_view_features(demo_root):
    config = tiny_config(feature_cache=False)
    samples, _ = find_class_samples(demo_root, 'demo_washer')
    torch.cuda.manual_seed_all(123)
    before = torch.cuda.get_rng_state()
    model = DifferNet(config).to('cuda').eval()
    seeded_view_features(model, samples, 3, 77, config, torch.device('cuda'), 'views')
    MultiViewDataset(samples, 3, config, view_seed=5)[0]
    assert torch.equal(torch.cuda.get_rng_state(), before)


@cuda
@pytest.mark.parametrize('backend', ['pil', 'tensor'])
def test_cuda_training_resume_and_pool_run(official_tree, tmp_path, backend):
    """Training, evaluation, the pool, and --resume on CUDA: resuming after meta epoch 0 reproduces the
    uninterrupted run (up to GPU float rounding)."""
    config = tiny_config(device='cuda', meta_epochs=2, resume_interval_s=0, view_backend=backend,
                         cache_test_features=False, adam_fused=True)
    train_samples, test_samples = find_class_samples(str(official_tree), 'widget')
    torch.manual_seed(0)
    whole = train_class(DifferNet(config), train_samples, test_samples, config, torch.device('cuda'))
    resume_path = str(tmp_path / 'state.pt')
    torch.manual_seed(0)
    with pytest.raises(StoppedAfterMetaEpoch0):  # leaves the state after meta epoch 0 in resume_path
        train_class(DifferNet(config), train_samples, test_samples, config, torch.device('cuda'),
                    on_meta_epoch=stop_after_meta_epoch_0, resume_path=resume_path)
    torch.manual_seed(0)
    resumed = train_class(DifferNet(config), train_samples, test_samples, config, torch.device('cuda'), resume_path=resume_path)
    assert np.allclose(resumed['test_scores'], whole['test_scores'], rtol=1e-3)
    pooled = train_class(DifferNet(config), train_samples, test_samples,
                         tiny_config(**{**vars(config), 'train_feature_pool': 4, 'bf16_autocast': True}),
                         torch.device('cuda'))
    assert len(pooled['auroc']) == 2


@cuda
def test_cuda_score_and_gradient_maps(official_tree, tmp_path):
    from main import main
    out = tmp_path / 'run'
    common = ['--dataset_path', str(official_tree), '--class_name', 'widget', '--img_size', '64', '--n_scales', '1',
              '--n_coupling_blocks', '2', '--fc_internal', '32', '--meta_epochs', '1', '--sub_epochs', '1',
              '--n_transforms_test', '4', '--pretrained', 'false', '--device', 'cuda', '--feature_cache', 'false']
    assert main(common + ['--results_dir', str(out), '--grad_map_viz', 'true']) == 0
    scores_csv = tmp_path / 'scores.csv'
    assert main(['--score', str(official_tree / 'widget' / 'test'), '--checkpoint', str(out / 'widget_checkpoint.pt'),
                 '--device', 'cuda', '--score_out', str(scores_csv), '--maps', str(tmp_path / 'maps')]) == 0
    assert scores_csv.read_text().count('\n') == 1 + 5


@cuda
def test_cuda_out_of_memory_is_recognised():
    from runner.jobs import is_out_of_memory
    with pytest.raises(torch.cuda.OutOfMemoryError) as caught:
        torch.empty(1 << 50, dtype=torch.uint8, device='cuda')
    assert is_out_of_memory(caught.value)


def test_out_of_memory_error_type_is_recognised():
    from runner.jobs import is_out_of_memory
    assert is_out_of_memory(torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB'))


# --- benchmarks/gpu_check.py works before it meets a GPU -----------------------------------------------

def test_gpu_check_quick_runs_on_the_cpu_and_prints_one_json(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'benchmarks', 'gpu_check.py'), '--quick',
                             '--work_dir', str(tmp_path)], capture_output=True, text=True, cwd=str(tmp_path),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['device'] == 'cpu' and report['quick'] is True
    for precision in ('fp32', 'tf32', 'bf16'):
        assert report['views_per_s'][precision] > 0
    assert report['flow_step_ms'] > 0
    run = report['full_run']
    assert run['wall_s'] > 0 and 0 <= run['last_auroc'] <= 1 and 0 <= run['max_auroc'] <= 1
    assert report['cuda_tests']['skipped'] or report['cuda_tests']['returncode'] == 0
