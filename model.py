"""The DifferNet network and its checkpoints: a frozen ImageNet AlexNet turns images into 768 features, a
flow maps them to z; a checkpoint holds what scoring needs without the run's config.

The ImageNet weights come from alexnet_weights.py.
"""
import hashlib
import os
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from alexnet_weights import features_state_from_full, load_imagenet_alexnet_features
from atomic_files import replace_atomically
from errors import UserError
from freia_funcs import DifferNetFlow
from hardware import onednn_linear

N_FEATURES_PER_SCALE = 256  # channels of AlexNet's last conv block


def build_flow(config):
    """The flow of DifferNet for `config`: n_coupling_blocks GLOW blocks over 256 * n_scales features."""
    return DifferNetFlow(N_FEATURES_PER_SCALE * config.n_scales, config.n_coupling_blocks, config.fc_internal,
                         config.clamp_alpha, config.dropout)


class AlexNetFeatures(nn.Module):
    """Holds torchvision AlexNet's `features` under the official attribute names, so checkpoint keys read
    `feature_extractor.features.N.*` as in the official DifferNet (its unused classifier is not built)."""

    def __init__(self):
        super().__init__()
        self.features = torchvision.models.alexnet(weights=None).features


class DifferNet(nn.Module):
    """Frozen multi-scale AlexNet features + normalizing flow.

    features(x): for s in 0..n_scales-1, AlexNet `features` of x (s = 0) or of its nearest-neighbour
    rescale to img_size // 2**s, averaged over height and width, concatenated: (batch, 256 * n_scales).
    forward(x): (z, log|det J|) of the flow applied to features(x).
    """

    def __init__(self, config, alexnet_features_state=None):
        super().__init__()
        self.img_size = config.img_size
        self.n_scales = config.n_scales
        self.n_features = N_FEATURES_PER_SCALE * config.n_scales
        self.feature_extractor = AlexNetFeatures()
        if alexnet_features_state is not None:
            self.feature_extractor.features.load_state_dict(alexnet_features_state)
        self.feature_extractor.requires_grad_(False)
        self.feature_extractor.eval()
        self.nf = build_flow(config)

    def use_flow_kernel(self, kernel):
        """Computes the flow's layers with `kernel` ('default': PyTorch's own; 'onednn': hardware.onednn_linear)."""
        self.nf.use_linear(onednn_linear if kernel == 'onednn' else F.linear)
        return self

    def train(self, mode=True):
        # The extractor is frozen: it stays in eval mode whatever the flow does.
        super().train(mode)
        self.feature_extractor.eval()
        return self

    def features(self, images):
        pooled = []
        for s in range(self.n_scales):
            scaled = F.interpolate(images, size=self.img_size // 2 ** s) if s > 0 else images
            pooled.append(torch.mean(self.feature_extractor.features(scaled), dim=(2, 3)))
        return torch.cat(pooled, dim=1)

    def forward(self, images):
        return self.nf(self.features(images))

    def extractor_digest(self):
        """sha256 of the AlexNet weights: identifies the extractor in feature-cache keys and checkpoints."""
        digest = hashlib.sha256()
        for name, tensor in self.feature_extractor.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


def build_model(config):
    """DifferNet with the ImageNet weights `config` asks for; returns (model, weights_source)."""
    if not config.pretrained:
        print('!' * 78 + '\n!!! pretrained = False: AlexNet has RANDOM weights. '
              'Scores are meaningless except in tests. !!!\n' + '!' * 78, flush=True)
        return DifferNet(config), 'random (pretrained = False)'
    state, source = load_imagenet_alexnet_features(config.weights_path)
    return DifferNet(config, state), source


CHECKPOINT_FORMAT = 'differnet-checkpoint'
CHECKPOINT_VERSION = 1

# the values that shape the network, the views and the numbers of a score: a checkpoint carries them so
# that scoring needs no config.py of the run that trained it
MODEL_SETTINGS = ('img_size', 'n_scales', 'n_coupling_blocks', 'clamp_alpha', 'fc_internal', 'dropout')
VIEW_SETTINGS = ('norm_mean', 'norm_std', 'n_transforms_test', 'transf_rotations', 'transf_brightness',
                 'transf_contrast', 'transf_saturation', 'seed')
NUMERIC_SETTINGS = ('channels_last', 'bf16_autocast', 'extract_batch_size', 'batch_size_test')
CHECKPOINT_SETTINGS = MODEL_SETTINGS + VIEW_SETTINGS + NUMERIC_SETTINGS


def save_checkpoint(path, model, config, weights_source, history, reference_scores, class_name=''):
    """Writes one file (atomically) that scores images without the config of the run:

        settings          CHECKPOINT_SETTINGS of `config`
        flow_state        the flow's state dict
        extractor         {source, digest (extractor_digest), state: the AlexNet weights when they are
                          not the ImageNet ones this machine can reload (random or a weights_path file),
                          else None}
        history           the training history (JSON-like)
        reference_scores  {'training': stats, 'validation': stats or None} of defect-free images, stats
                          as `scoring.score_statistics`
    """
    reloadable = config.pretrained and not config.weights_path
    checkpoint = {
        'format': CHECKPOINT_FORMAT, 'version': CHECKPOINT_VERSION, 'class_name': class_name,
        'settings': {name: getattr(config, name) for name in CHECKPOINT_SETTINGS},
        'flow_state': {k: v.detach().cpu() for k, v in model.nf.state_dict().items()},
        'extractor': {'source': weights_source, 'digest': model.extractor_digest(),
                      'state': None if reloadable else {k: v.detach().cpu().contiguous() for k, v in
                                                        model.feature_extractor.features.state_dict().items()}},
        'history': history, 'reference_scores': reference_scores,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    replace_atomically(path, lambda part: torch.save(checkpoint, part))


def load_checkpoint(path, config):
    """(model on the CPU in eval mode, checkpoint dict) from a file of `save_checkpoint` or an official
    DifferNet state dict (`save_weights`: `feature_extractor.*` and `nf.*` keys).

    For an official file the returned dict has the same keys, with settings from the flow's shapes
    (n_scales, n_coupling_blocks, fc_internal) and from `config` for the rest (config.py's paper values
    unless overridden, e.g. img_size), and no history or reference scores. ImageNet extractor weights
    not stored in the file are reloaded (`config.weights_path`, if set, says from where) and must have
    the digest they were trained with.
    """
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} does not exist; give the <class>_checkpoint.pt of a training run')
    try:
        stored = load_tensors(path)
    except Exception as error:
        raise UserError(f'checkpoint {path} cannot be read ({type(error).__name__}); give a file written '
                        f'by a training run or the official save_weights') from None
    if isinstance(stored, dict) and stored.get('format') == CHECKPOINT_FORMAT:
        checkpoint = stored
    elif isinstance(stored, dict) and any(str(k).startswith('nf.') for k in stored):
        checkpoint = checkpoint_from_official(stored, path, config)
    else:
        raise UserError(f'checkpoint {path} is neither a DifferNet checkpoint of this code nor an official '
                        f'state dict (no nf.* keys)')
    settings = types.SimpleNamespace(**checkpoint['settings'])
    extractor = checkpoint['extractor']
    if extractor['state'] is not None:
        features_state = extractor['state']
    else:
        stored_file = extractor['source'][len('file '):] if extractor['source'].startswith('file ') else ''
        features_state, _ = load_imagenet_alexnet_features(config.weights_path or stored_file)
    model = DifferNet(settings, features_state)
    if extractor['digest'] is not None and model.extractor_digest() != extractor['digest']:
        raise UserError(f'the AlexNet weights found here differ from those checkpoint {path} was trained with '
                        f"({extractor['source']}); give those with --weights_path FILE")
    if checkpoint.get('official'):
        model.nf.load_official_state_dict(checkpoint['flow_state'])
    else:
        model.nf.load_state_dict(checkpoint['flow_state'])
    return model.eval(), checkpoint


def load_tensors(path):
    """torch.load of a checkpoint, memory-mapped where the file allows it (the zip format torch.save writes):
    the flow's weights are read from the page cache as they are used instead of copied in first."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError:  # an older, non-zip file
        return torch.load(path, map_location='cpu', weights_only=True)


def checkpoint_from_official(state, path, config):
    """The `load_checkpoint` dict of an official state dict: the flow's shapes read from its weights,
    the other settings from `config`."""
    flow_state = {k[len('nf.'):]: v for k, v in state.items() if k.startswith('nf.')}
    # official coupling k sits at module_list.(2k+2) (or 2k+1 in some ports); s1 sees the first half of
    # the features, s2 the rest, so their fc1 input widths add up to the feature count
    fc1_in = {}
    for key, value in flow_state.items():
        parts = key.split('.')
        if len(parts) == 5 and parts[0] == 'module_list' and parts[3:] == ['fc1', 'weight']:
            fc1_in.setdefault(int(parts[1]), {})[parts[2]] = value.shape
    if not fc1_in:
        raise UserError(f'checkpoint {path} has nf.* keys but no coupling weights (nf.module_list.N.s1.fc1.weight)')
    first = fc1_in[min(fc1_in)]
    n_dims = first['s1'][1] + first['s2'][1]
    if n_dims % N_FEATURES_PER_SCALE:
        raise UserError(f'checkpoint {path}: the flow takes {n_dims} features, not a multiple of '
                        f'{N_FEATURES_PER_SCALE}; it is not a DifferNet flow')
    settings = {name: getattr(config, name) for name in CHECKPOINT_SETTINGS}
    settings.update(n_scales=n_dims // N_FEATURES_PER_SCALE, n_coupling_blocks=len(fc1_in),
                    fc_internal=first['s1'][0])
    try:
        features_state = features_state_from_full(state)
    except KeyError:
        raise UserError(f'checkpoint {path} has no feature_extractor.features.* weights') from None
    extractor = {'source': f'official checkpoint {path}', 'state': features_state, 'digest': None}
    return {'format': 'official', 'official': True, 'class_name': '', 'settings': settings,
            'flow_state': flow_state, 'extractor': extractor, 'history': None,
            'reference_scores': {'training': None, 'validation': None}}
