"""The official numbers the demo cannot pin down: three Adam steps of the training step, and rotated views.

train_step_reference.pt and views_reference.pt were made with the official code (tests/golden/README.md).
A wrong learning rate, Adam betas, soft clamp or rotation interpolation changes these numbers far beyond
float32 rounding, while the demo's AUROC would not move.
"""
import os
import contextlib
import types

import pytest
import torch
from official_views import view_transform
from torchvision import transforms

from conftest import GOLDEN_DIR, require_data, tiny_config
from model import view_features
from freia_funcs import DifferNetFlow
from model import DifferNet
from base.hardware import onednn_linear
from train import flow_step, make_optimizer
from utils import MultiViewDataset
from image_data.image_files import Sample, load_rgb

SUBNETS = ('s1', 's2')
LINEARS = ('fc1', 'fc2', 'fc2b', 'fc3')


def coupling_linears(flow):
    """(block k, subnet, fc, nn.Linear) of every coupling subnet layer, in the reference files' layout."""
    n_blocks = (len(flow.module_list) - 1) // 2
    for k in range(n_blocks):
        layer = flow.module_list[2 * k + 2]
        for subnet in SUBNETS:
            for fc in LINEARS:
                yield k, subnet, fc, getattr(getattr(layer, subnet), fc)


@pytest.fixture(scope='module')
def train_step_golden():
    return torch.load(os.path.join(GOLDEN_DIR, 'train_step_reference.pt'), weights_only=True)


@pytest.mark.parametrize('adam_fused, kernel', [(False, 'default'), (True, 'default'), (True, 'onednn')])
def test_reproduces_official_training_steps(train_step_golden, adam_fused, kernel):
    golden = train_step_golden
    reference = golden['config']
    # everything that decides the numbers comes from config.py (the paper's values), as in a real run;
    # only the flow's size is the reference's tiny one
    config = tiny_config(adam_fused=adam_fused)
    flow = DifferNetFlow(reference['dim'], reference['n_blocks'], reference['internal'], config.clamp_alpha,
                         config.dropout)
    with torch.no_grad():
        for k, subnet, fc, linear in coupling_linears(flow):
            linear.weight.copy_(golden['initial_couplings'][k][subnet][fc]['weight'])
            linear.bias.copy_(golden['initial_couplings'][k][subnet][fc]['bias'])
    if kernel == 'onednn':  # the same update with the products through oneDNN (cpu_flow_kernel onednn)
        flow.use_linear(onednn_linear)
    flow.train()
    model = types.SimpleNamespace(nf=flow, autocast=contextlib.nullcontext)  # flow_step touches model.nf, fp32
    optimizer = make_optimizer(flow, config)

    losses, first_grads = [], None
    for step in range(golden['x'].shape[0]):
        # keep the gradients of step 0: flow_step zeroes them at the start of the next step
        losses.append(flow_step(model, optimizer, golden["x"][step], config.max_grad_norm))
        if step == 0:
            first_grads = {(k, s, fc): (lin.weight.grad.clone(), lin.bias.grad.clone())
                           for k, s, fc, lin in coupling_linears(flow)}

    assert torch.allclose(torch.tensor(losses), golden['losses'], rtol=1e-5, atol=0)
    for k, subnet, fc, linear in coupling_linears(flow):
        expected_grad = golden['first_step_grads'][k][subnet][fc]
        expected_final = golden['final_couplings'][k][subnet][fc]
        initial = golden['initial_couplings'][k][subnet][fc]
        for i, part in enumerate(('weight', 'bias')):
            grad = first_grads[(k, subnet, fc)][i]
            scale = expected_grad[part].abs().max()
            assert torch.allclose(grad, expected_grad[part], rtol=1e-4, atol=1e-5 * scale), (k, subnet, fc, part)
            # compared as the change from the initial weights: three steps move a weight by ~1e-4 at most,
            # which a weight-sized tolerance would not see
            moved = getattr(linear, part).detach() - initial[part]
            expected_moved = expected_final[part] - initial[part]
            assert torch.allclose(moved, expected_moved, rtol=1e-3, atol=1e-3 * expected_moved.abs().max()), \
                (k, subnet, fc, part, (moved - expected_moved).abs().max().item())


@pytest.fixture(scope='module')
def views_golden():
    golden = torch.load(os.path.join(GOLDEN_DIR, 'views_reference.pt'), weights_only=True)
    assert golden['features'] and len(golden['angles_degrees']) == 5
    return golden


@pytest.fixture(scope='module')
def paper_extractor(imagenet_state):
    """The paper-sized extractor with the ImageNet weights, prepared as a training run prepares it."""
    config = tiny_config(img_size=448, n_scales=3)  # every view setting from config.py, as a real run
    model = DifferNet(config, imagenet_state).eval()
    model.prepare(config, 'cpu')
    return model, config


def assert_matches_official(features, expected, what):
    assert features.shape == expected.shape
    relative = ((features - expected).abs().max() / expected.abs().max()).item()
    assert relative < 2e-5, f'{what}: max relative deviation {relative:.2e}'


def test_random_rotation_views_reproduce_official(views_golden, paper_extractor, monkeypatch):
    """The training/test views (RandomRotation(180) through MultiViewDataset) with the drawn angle
    replaced by each fixed one, as the reference was made."""
    model, config = paper_extractor
    paths = [require_data(relative) for relative in views_golden['features']]
    dataset = MultiViewDataset([Sample(path, 0, 'good', None) for path in paths], 1, config)
    for a, angle in enumerate(views_golden['angles_degrees']):
        monkeypatch.setattr(transforms.RandomRotation, 'get_params', staticmethod(lambda degrees: angle))
        views = torch.cat([dataset.views_of(i, torch.device('cpu')) for i in range(len(paths))])
        features = view_features(model, views, (config.norm_mean, config.norm_std))
        for i, relative in enumerate(views_golden['features']):
            assert_matches_official(features[i], views_golden['features'][relative][a], f'{relative} at {angle}')


def test_fixed_angle_views_reproduce_official(views_golden, paper_extractor):
    """The fixed-angle path (reference views, fixed_test_rotations) gives the same views as the
    official RandomRotation at that angle."""
    model, config = paper_extractor
    for relative, expected in views_golden['features'].items():
        image = load_rgb(require_data(relative))
        views = torch.stack([view_transform(config, rotation_angle=angle)(image)
                             for angle in views_golden['angles_degrees']])
        assert_matches_official(view_features(model, views, (config.norm_mean, config.norm_std)), expected, relative)
