"""The speed-ups return exactly what the on-line path computes, and a stale feature cache is never used."""
import logging
import json
import os

import pytest
import torch

from conftest import tiny_config
from model import dataset_features, seeded_view_features
from utils import dataset_loader
from base import hardware
from base.hardware import bf16_pays_off, choose_precision
from main import main as main_entry
from model import DifferNet
from train import pool_batches, train_class
from utils import MultiViewDataset
from image_data.layouts import find_class_samples

DEVICE = torch.device('cpu')


def tiny_model(config):
    torch.manual_seed(0)
    return DifferNet(config).eval()


def test_pool_and_test_cache_equal_the_online_features_for_the_same_view_seeds(official_tree, tmp_path):
    config = tiny_config(feature_cache=True, feature_cache_dir=str(tmp_path / 'cache'))
    model = tiny_model(config)
    train, test = find_class_samples(str(official_tree), 'widget')
    for samples in (train, test):
        pooled, labels = seeded_view_features(model, samples, 5, 123, config, DEVICE, 'pool')
        # the on-line path: a shuffled loader, other batch sizes, the views drawn from the same seed
        online_set = MultiViewDataset(samples, 5, config, view_seed=123)
        loader = torch.utils.data.DataLoader(online_set, batch_size=2, shuffle=True)
        seen = 0
        for batch, batch_labels in loader:
            views = online_set.batch_views(batch, DEVICE)
            flat = views.reshape(-1, *views.shape[2:])
            with torch.no_grad():
                online = model.features(flat).view(views.shape[0], 5, -1)
            for features in online:
                matches = [i for i in range(len(samples)) if torch.allclose(pooled[i], features, atol=1e-6)]
                assert len(matches) == 1
                seen += 1
        assert seen == len(samples)
        assert list(labels) == [s.label for s in samples]
        cached, cached_labels = seeded_view_features(model, samples, 5, 123, config, DEVICE, 'pool')
        assert torch.equal(cached, pooled) and list(cached_labels) == list(labels)


def test_views_depend_on_the_seed_not_on_the_loader(official_tree):
    config = tiny_config()
    train, _ = find_class_samples(str(official_tree), 'widget')
    dataset = MultiViewDataset(train, 3, config, view_seed=7)
    torch.manual_seed(1)
    first = dataset[2][0]
    torch.manual_seed(999)  # the global stream does not matter
    assert torch.equal(first, dataset[2][0])
    assert not torch.equal(first, MultiViewDataset(train, 3, config, view_seed=8)[2][0])


def test_pool_batches_draw_distinct_pooled_views_of_every_image_once():
    pool = torch.arange(5 * 6 * 1, dtype=torch.float32).view(5, 6, 1)  # image i, view k -> 6 i + k
    torch.manual_seed(0)
    batches = list(pool_batches(pool, batch_size=2, n_views=4))
    assert [len(batch) for batch in batches] == [8, 8, 4]
    values = torch.cat(batches).view(-1, 4)
    images = (values // 6).long()
    assert all(len(set(row.tolist())) == 1 for row in images)  # the 4 views of a row come from one image
    assert sorted(images[:, 0].tolist()) == [0, 1, 2, 3, 4]
    assert all(len(set(row.tolist())) == 4 for row in values)  # without replacement


def test_stale_disk_cache_is_never_used(official_tree, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    config = tiny_config(feature_cache=True, feature_cache_dir=str(tmp_path / 'cache'))
    model = tiny_model(config)
    _, test = find_class_samples(str(official_tree), 'widget')
    first, _ = seeded_view_features(model, test, 2, 5, config, DEVICE, 'test views')
    seeded_view_features(model, test, 2, 5, config, DEVICE, 'test views')
    assert 'from the feature cache' in caplog.messages[-1]
    # the same bytes with new modification times (a data folder copied afresh): the cached features
    for sample in test:
        os.utime(sample.path, ns=(os.stat(sample.path).st_atime_ns, os.stat(sample.path).st_mtime_ns + 10**9))
    again, _ = seeded_view_features(model, test, 2, 5, config, DEVICE, 'test views')
    assert 'from the feature cache' in caplog.messages[-1] and torch.equal(first, again)
    # an image changed on disk, its size and modification time kept: recomputed, new features
    import io
    from PIL import Image
    changed = test[0].path
    stat = os.stat(changed)
    colour = Image.open(changed).convert('RGB').getpixel((0, 0))
    for candidate in [colour[:k] + ((colour[k] + d) % 256,) + colour[k + 1:] for d in range(1, 256) for k in range(3)]:
        encoded = io.BytesIO()  # another colour whose PNG has as many bytes
        Image.new('RGB', (40, 40), candidate).save(encoded, 'PNG')
        if len(encoded.getvalue()) == stat.st_size:
            break
    with open(changed, 'wb') as handle:
        handle.write(encoded.getvalue())
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(changed).st_size == stat.st_size and os.stat(changed).st_mtime_ns == stat.st_mtime_ns
    second, _ = seeded_view_features(model, test, 2, 5, config, DEVICE, 'test views')
    assert 'extracted' in caplog.messages[-1] and not torch.equal(first[0], second[0])
    # other settings, another view seed, other weights: never the cached features
    for other_config, seed, other_model in [(tiny_config(feature_cache=True, feature_cache_dir=config.feature_cache_dir,
                                                         transf_rotations=False), 5, model),
                                            (tiny_config(feature_cache=True, feature_cache_dir=config.feature_cache_dir,
                                                         extract_batch_size=5), 5, model),
                                            (config, 6, model),
                                            (config, 5, DifferNet(config).eval())]:
        seeded_view_features(other_model, test, 2, seed, other_config, DEVICE, 'test views')
        assert 'extracted' in caplog.messages[-1]
    # a damaged cache file is recomputed, not trusted
    for name in os.listdir(config.feature_cache_dir):
        with open(os.path.join(config.feature_cache_dir, name), 'wb') as handle:
            handle.write(b'garbage')
    seeded_view_features(model, test, 2, 5, config, DEVICE, 'test views')
    assert 'extracted' in caplog.messages[-1]


def test_extraction_batches_do_not_change_features(official_tree):
    config = tiny_config()
    model = tiny_model(config)
    _, test = find_class_samples(str(official_tree), 'widget')
    dataset = MultiViewDataset(test, 3, config, view_seed=1)
    one, _ = dataset_features(model, dataset_loader(dataset, 1, False, config, DEVICE), DEVICE, config)
    big_config = tiny_config(extract_batch_size=64)
    many, _ = dataset_features(model, dataset_loader(dataset, 4, False, big_config, DEVICE), DEVICE, big_config)
    assert torch.allclose(one, many, atol=1e-6)
    assert one.shape == (len(test), 3, 256)


def test_precision_auto_takes_bf16_only_where_it_pays_off_and_says_why():
    assert choose_precision('auto', True, 'cpu has AMX') == (True, 'precision: bfloat16 (bf16_autocast auto: cpu has AMX)')
    assert choose_precision('auto', False, 'cuda has no native bfloat16') == (
        False, 'precision: float32 (bf16_autocast auto: cuda has no native bfloat16)')
    forced, line = choose_precision(True, False, 'cpu has no native bfloat16')
    assert forced and line.startswith('warning:') and '--bf16_autocast auto or false' in line
    assert 'cpu has no native bfloat16' in line
    assert choose_precision(True, True, 'why') == (True, 'precision: bfloat16 (bf16_autocast true)')
    off, line = choose_precision(False, True, 'cpu has AMX')
    assert not off and 'as the paper; cpu has AMX' in line and '--bf16_autocast auto measures whether' in line
    off, line = choose_precision(False, False, 'cpu has no native bfloat16')
    assert not off and 'measures whether' not in line


@pytest.mark.parametrize('amx, avx512_bf16, expected, reason', [
    (True, True, True, 'cpu has AMX'),
    (False, True, False, 'cpu has AVX512-BF16 without AMX'),  # native, but unmeasured: no claim of speed
    (False, False, False, 'cpu has no native bfloat16'),
])
def test_cpu_bf16_guess_without_measuring(monkeypatch, amx, avx512_bf16, expected, reason):
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx512_bf16, raising=False)
    fast, why = bf16_pays_off(torch.device('cpu'))
    assert fast is expected and why == reason


@pytest.mark.parametrize('amx, speedup, expected', [(False, 1.6, True), (True, 0.9, False), (True, 1.1, False)])
def test_cpu_bf16_auto_follows_the_measurement_not_the_vendor(monkeypatch, amx, speedup, expected):
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: True, raising=False)
    monkeypatch.setattr(hardware, 'bf16_convolution_speedup', lambda: speedup)
    fast, why = bf16_pays_off(torch.device('cpu'), measure=True)
    assert fast is expected and f'measured now: bfloat16 convolutions {speedup:.1f}x as fast as float32' in why
    use_bf16, line = choose_precision('auto', fast, why)
    assert use_bf16 is expected and 'measured now' in line


def test_cpu_bf16_measurement_runs_here():
    assert hardware.bf16_convolution_speedup(repeats=1) > 0


@pytest.mark.parametrize('vendor, expected', [('AuthenticAMD', 'onednn'), ('GenuineIntel', 'default'), ('', 'default')])
def test_flow_kernel_auto_follows_what_the_cpu_is(monkeypatch, vendor, expected):
    monkeypatch.setattr(hardware, 'cpu_vendor', lambda: vendor)
    kernels = {hardware.choose_flow_kernel('auto', torch.device('cpu'), False, 96, 2048) for _ in range(3)}
    assert len(kernels) == 1  # the same choice every time: the same numbers on a machine
    kernel, line = kernels.pop()
    assert kernel == expected and 'cpu_flow_kernel auto' in line and (vendor in line)


def test_cpu_vendor_reads_this_machine():
    assert isinstance(hardware.cpu_vendor(), str)


def test_flow_kernel_explicit_gpu_and_bf16_choices():
    cpu = torch.device('cpu')
    assert hardware.choose_flow_kernel('onednn', cpu, False, 96, 2048)[0] == 'onednn'
    assert hardware.choose_flow_kernel('default', cpu, False, 96, 2048)[0] == 'default'
    assert hardware.choose_flow_kernel('onednn', torch.device('cuda'), False, 96, 2048)[0] == 'default'
    assert hardware.choose_flow_kernel('onednn', cpu, True, 96, 2048)[0] == 'default'  # autocast's own kernels


def test_cpu_check_without_torch_support_says_float32(monkeypatch):
    monkeypatch.delattr(torch.cpu, '_is_amx_tile_supported', raising=False)
    monkeypatch.delattr(torch.cpu, '_is_avx512_bf16_supported', raising=False)
    assert bf16_pays_off(torch.device('cpu')) == (False, 'cpu has no native bfloat16')


@pytest.mark.parametrize('cuda_bf16', [True, False])
def test_cuda_bf16_check_follows_the_gpu(monkeypatch, cuda_bf16):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: cuda_bf16)
    fast, why = bf16_pays_off(torch.device('cuda'))
    assert fast is cuda_bf16
    assert why == ('cuda computes bfloat16 natively' if cuda_bf16 else 'cuda has no native bfloat16')


@pytest.mark.parametrize('cuda_present', [True, False])
def test_auto_device_and_auto_precision_together(monkeypatch, cuda_present):
    """device 'auto' and bf16_autocast 'auto': a CUDA GPU with bf16 gets bf16; without CUDA, a CPU without
    AMX gets float32. The config handed on holds the choice, not 'auto'."""
    from base.hardware import resolve_device
    from runner.jobs import with_machine_choices
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: cuda_present)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False, raising=False)
    device = resolve_device('auto')
    monkeypatch.setattr(hardware, 'bf16_convolution_speedup', lambda: 0.9)  # a CPU where bf16 measures slower
    config, (line, _) = with_machine_choices(tiny_config(bf16_autocast='auto'), device)
    assert device.type == ('cuda' if cuda_present else 'cpu')
    assert config.bf16_autocast is cuda_present
    assert line.startswith('precision: bfloat16 (bf16_autocast auto: cuda' if cuda_present
                           else 'precision: float32 (bf16_autocast auto: cpu')


@pytest.mark.parametrize('native', [True, False])
def test_run_with_auto_precision_prints_and_records_its_choice(official_tree, tmp_path, monkeypatch, capsys, native):
    from runner import jobs
    monkeypatch.setattr(jobs, 'bf16_pays_off', lambda device, measure: (native, 'cpu has AMX' if native else 'cpu has no AMX'))
    out = tmp_path / 'run'
    assert main_entry(['--dataset_path', str(official_tree), '--class_name', 'widget', '--results_dir', str(out),
                       '--img_size', '64', '--n_scales', '1', '--n_coupling_blocks', '2', '--fc_internal', '32',
                       '--meta_epochs', '1', '--sub_epochs', '1', '--n_transforms', '2', '--n_transforms_test', '2',
                       '--pretrained', 'false', '--device', 'cpu', '--feature_cache', 'false',
                       '--bf16_autocast', 'auto']) == 0
    printed = capsys.readouterr().out
    expected = 'bfloat16 (bf16_autocast auto: cpu has AMX)' if native else 'float32 (bf16_autocast auto: cpu has no AMX)'
    assert f'precision: {expected}' in printed
    with open(out / 'results.json') as handle:
        assert json.load(handle)['config']['bf16_autocast'] is native
    with open(out / 'results.md') as handle:
        assert ('bf16_autocast' in handle.read()) is native  # the deviation list names the choice


@pytest.mark.parametrize('pool', [0, 3])
def test_training_is_the_same_whether_features_come_from_the_disk_cache(official_tree, tmp_path, pool, caplog):
    caplog.set_level(logging.INFO)
    """A cached run must not skip a random draw that a computing run makes (the DataLoader's base seed)."""
    config = tiny_config(feature_cache=True, feature_cache_dir=str(tmp_path / 'cache'), train_feature_pool=pool,
                         sub_epochs=2, meta_epochs=2)
    train, test = find_class_samples(str(official_tree), 'widget')
    histories = []
    for _ in range(2):  # the first run extracts and stores, the second reads the cache
        torch.manual_seed(5)
        model = DifferNet(config)
        histories.append(train_class(model, train, test, config, DEVICE))
    assert any('from the feature cache' in message for message in caplog.messages)
    assert histories[0]['train_loss'] == histories[1]['train_loss']
    assert histories[0]['test_scores'] == histories[1]['test_scores']


def test_a_run_with_other_views_per_alexnet_pass_extracts_its_own_test_features(official_tree, tmp_path, capsys):
    """extract_batch_size changes float rounding (docs/faithfulness.md): a run with 5 views per pass must not
    take the test features a run with 8 extracted."""
    from main import main
    common = ['--dataset_path', str(official_tree), '--class_name', 'widget', '--pretrained', 'false',
              '--img_size', '64', '--n_scales', '1', '--fc_internal', '16', '--n_coupling_blocks', '2',
              '--meta_epochs', '1', '--sub_epochs', '1', '--n_transforms', '2', '--n_transforms_test', '4',
              '--save_checkpoint', 'false', '--feature_cache_dir', str(tmp_path / 'cache')]
    printed = []
    for run, views_per_pass in enumerate(['8', '5', '8']):
        assert main(common + ['--extract_batch_size', views_per_pass, '--results_dir', str(tmp_path / str(run))]) == 0
        printed.append(capsys.readouterr().out)
    assert 'test views: extracted' in printed[0]
    assert 'test views: extracted' in printed[1] and 'from the feature cache' not in printed[1]
    assert 'test views: 5 images x 4 views from the feature cache' in printed[2]
