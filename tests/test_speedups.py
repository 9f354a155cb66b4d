"""The speed-ups return exactly what the on-line path computes, and a stale feature cache is never used."""
import json
import os

import pytest
import torch

from conftest import tiny_config
from main import main as main_entry
from model import DifferNet
from train import extract_all_features, fixed_view_features, make_loader, pool_batches, train_class
from utils import MultiViewDataset, choose_precision, find_class_samples, has_native_bf16

DEVICE = torch.device('cpu')


def tiny_model(config):
    torch.manual_seed(0)
    return DifferNet(config).eval()


def test_pool_and_test_cache_equal_the_online_features_for_the_same_view_seeds(official_tree, tmp_path):
    config = tiny_config(feature_cache=True, feature_cache_dir=str(tmp_path / 'cache'))
    model = tiny_model(config)
    train, test = find_class_samples(str(official_tree), 'widget')
    for samples in (train, test):
        pooled, labels = fixed_view_features(model, samples, 5, 123, config, DEVICE, 'pool', log=lambda line: None)
        # the on-line path: a shuffled loader, other batch sizes, the views drawn from the same seed
        online_set = MultiViewDataset(samples, 5, config, view_seed=123)
        loader = torch.utils.data.DataLoader(online_set, batch_size=2, shuffle=True)
        seen = 0
        for views, batch_labels in loader:
            flat = views.view(-1, *views.shape[2:])
            with torch.no_grad():
                online = model.features(flat).view(views.shape[0], 5, -1)
            for features in online:
                matches = [i for i in range(len(samples)) if torch.allclose(pooled[i], features, atol=1e-6)]
                assert len(matches) == 1
                seen += 1
        assert seen == len(samples)
        assert list(labels) == [s.label for s in samples]
        cached, cached_labels = fixed_view_features(model, samples, 5, 123, config, DEVICE, 'pool',
                                                    log=lambda line: None)
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


def test_stale_disk_cache_is_never_used(official_tree, tmp_path):
    config = tiny_config(feature_cache=True, feature_cache_dir=str(tmp_path / 'cache'))
    model = tiny_model(config)
    _, test = find_class_samples(str(official_tree), 'widget')
    messages = []
    first, _ = fixed_view_features(model, test, 2, 5, config, DEVICE, 'test views', log=messages.append)
    fixed_view_features(model, test, 2, 5, config, DEVICE, 'test views', log=messages.append)
    assert 'from the feature cache' in messages[-1]
    # an image changed on disk (new content, new modification time): recomputed, new features
    changed = test[0].path
    from PIL import Image
    Image.new('RGB', (40, 40), (0, 255, 0)).save(changed)
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
    second, _ = fixed_view_features(model, test, 2, 5, config, DEVICE, 'test views', log=messages.append)
    assert 'extracted' in messages[-1] and not torch.equal(first[0], second[0])
    # other settings, another view seed, other weights: never the cached features
    for other_config, seed, other_model in [(tiny_config(feature_cache=True, feature_cache_dir=config.feature_cache_dir,
                                                         transf_rotations=False), 5, model),
                                            (config, 6, model),
                                            (config, 5, DifferNet(config).eval())]:
        fixed_view_features(other_model, test, 2, seed, other_config, DEVICE, 'test views', log=messages.append)
        assert 'extracted' in messages[-1]
    # a damaged cache file is recomputed, not trusted
    for name in os.listdir(config.feature_cache_dir):
        with open(os.path.join(config.feature_cache_dir, name), 'wb') as handle:
            handle.write(b'garbage')
    fixed_view_features(model, test, 2, 5, config, DEVICE, 'test views', log=messages.append)
    assert 'extracted' in messages[-1]


def test_extraction_batches_do_not_change_features(official_tree):
    config = tiny_config()
    model = tiny_model(config)
    _, test = find_class_samples(str(official_tree), 'widget')
    dataset = MultiViewDataset(test, 3, config, view_seed=1)
    one, _ = extract_all_features(model, make_loader(dataset, 1, False, config), DEVICE, config)
    big_config = tiny_config(extract_batch_size=64)
    many, _ = extract_all_features(model, make_loader(dataset, 4, False, big_config), DEVICE, big_config)
    assert torch.allclose(one, many, atol=1e-6)
    assert one.shape == (len(test), 3, 256)


@pytest.mark.parametrize('device_type', ['cpu', 'cuda'])
def test_precision_auto_takes_bf16_only_where_native_and_says_why(device_type):
    device = torch.device(device_type)
    assert choose_precision('auto', device, native_bf16=True) == (
        True, f'precision: bfloat16 (bf16_autocast auto: {device_type} computes bfloat16 natively)')
    assert choose_precision('auto', device, native_bf16=False) == (
        False, f'precision: float32 (bf16_autocast auto: {device_type} has no native bfloat16)')
    forced, line = choose_precision(True, device, native_bf16=False)
    assert forced and line.startswith('warning:') and '--bf16_autocast auto or false' in line
    assert choose_precision(True, device, native_bf16=True) == (True, 'precision: bfloat16 (bf16_autocast true)')
    off, line = choose_precision(False, device, native_bf16=True)
    assert not off and '--bf16_autocast auto would use it' in line
    assert choose_precision(False, device, native_bf16=False)[0] is False


def test_native_bf16_check_follows_cuda_and_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: True)
    assert has_native_bf16(torch.device('cuda')) is True
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: False)
    assert has_native_bf16(torch.device('cuda')) is False
    assert isinstance(has_native_bf16(torch.device('cpu')), bool)


@pytest.mark.parametrize('native', [True, False])
def test_run_with_auto_precision_prints_and_records_its_choice(official_tree, tmp_path, monkeypatch, capsys, native):
    import utils
    monkeypatch.setattr(utils, 'has_native_bf16', lambda device: native)
    out = tmp_path / 'run'
    assert main_entry(['--dataset_path', str(official_tree), '--class_name', 'widget', '--results_dir', str(out),
                       '--img_size', '64', '--n_scales', '1', '--n_coupling_blocks', '2', '--fc_internal', '32',
                       '--meta_epochs', '1', '--sub_epochs', '1', '--n_transforms', '2', '--n_transforms_test', '2',
                       '--pretrained', 'false', '--device', 'cpu', '--feature_cache', 'false',
                       '--bf16_autocast', 'auto']) == 0
    printed = capsys.readouterr().out
    expected = 'bfloat16 (bf16_autocast auto: cpu computes' if native else 'float32 (bf16_autocast auto: cpu has no'
    assert f'precision: {expected}' in printed
    with open(out / 'results.json') as handle:
        assert json.load(handle)['config']['bf16_autocast'] is native
    with open(out / 'results.md') as handle:
        assert ('bf16_autocast' in handle.read()) is native  # the deviation list names the choice


@pytest.mark.parametrize('pool', [0, 3])
def test_training_is_the_same_whether_features_come_from_the_disk_cache(official_tree, tmp_path, pool):
    """A cached run must not skip a random draw that a computing run makes (the DataLoader's base seed)."""
    config = tiny_config(feature_cache=True, feature_cache_dir=str(tmp_path / 'cache'), train_feature_pool=pool,
                         sub_epochs=2, meta_epochs=2)
    train, test = find_class_samples(str(official_tree), 'widget')
    histories, messages = [], []
    for _ in range(2):  # the first run extracts and stores, the second reads the cache
        torch.manual_seed(5)
        model = DifferNet(config)
        histories.append(train_class(model, train, test, config, DEVICE, log=messages.append))
    assert any('from the feature cache' in message for message in messages)
    assert histories[0]['train_loss'] == histories[1]['train_loss']
    assert histories[0]['test_scores'] == histories[1]['test_scores']
