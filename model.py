"""The DifferNet model: a frozen ImageNet AlexNet turns each view into 768 features (256 per scale), a flow maps
them to z; an image's anomaly score is the mean of z^2 over its views. Here too: the features of a set of
images (views drawn once from a seed, from the disk cache when it holds them), and checkpoints, which hold what
scoring needs without the run's config.

The score is computed here only (`image_scores`, `view_scores`, `score_view_features`); training, evaluation,
the gradient maps, `deployment.scoring.Scorer` and the exported graph all call it, under the model's own
precision (`DifferNet.autocast`), so that a bfloat16 checkpoint is scored in bfloat16 everywhere.
"""
import hashlib
import logging
import os
import time
import types

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from base.alexnet_weights import features_state_from_full, load_imagenet_alexnet_features
from base.atomic_files import WriteFailed, replace_atomically
from base.errors import UserError
from base.feature_cache import feature_cache_key, load_cached_features, save_cached_features
from base.hardware import onednn_linear
from base.settings import settings_group
from base.settings_table import CHECKPOINT_SETTINGS
from freia_funcs import DifferNetFlow, nll_loss
from utils import MultiViewDataset, dataset_loader, normalize_views, progress, view_backend

logger = logging.getLogger(__name__)

N_FEATURES_PER_SCALE = 256  # channels of AlexNet's last conv block
TEST_VIEW_SEED_OFFSET = 1_000  # view seeds of the cached test views and of the training pool, kept
POOL_VIEW_SEED_OFFSET = 2_000  # apart from each other and from the run's own torch seed


def build_flow(model_settings):
    """The flow of DifferNet: n_coupling_blocks GLOW blocks over 256 * n_scales features."""
    return DifferNetFlow(N_FEATURES_PER_SCALE * model_settings.n_scales, model_settings.n_coupling_blocks,
                         model_settings.fc_internal, model_settings.clamp_alpha, model_settings.dropout)


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

    Its numerics (`prepare`: bfloat16 autocast, channels-last convolutions, the flow's CPU kernel, views
    per AlexNet pass) are the model's own, so that every path that scores with it rounds the same way.
    """

    def __init__(self, model_settings, alexnet_features_state=None):
        super().__init__()
        self.img_size = model_settings.img_size
        self.n_scales = model_settings.n_scales
        self.n_features = N_FEATURES_PER_SCALE * model_settings.n_scales
        self.feature_extractor = AlexNetFeatures()
        if alexnet_features_state is not None:
            self.feature_extractor.features.load_state_dict(alexnet_features_state)
        self.feature_extractor.requires_grad_(False)
        self.feature_extractor.eval()
        self.nf = build_flow(model_settings)
        self.bf16, self.channels_last, self.views_per_pass = False, False, 16

    def prepare(self, numerics, device):
        """Moves the model to `device` with the numerics of `numerics` (settings group 'numerics'): bfloat16
        autocast, channels-last AlexNet weights (NHWC convolutions), the flow's fp32 products ('onednn':
        hardware.onednn_linear, else PyTorch's own), and the views per AlexNet pass on this device."""
        device = torch.device(device)
        self.to(device)
        self.use_flow_kernel(numerics.cpu_flow_kernel)
        self.bf16, self.channels_last = bool(numerics.bf16_autocast), bool(numerics.channels_last)
        if self.channels_last:
            self.feature_extractor.to(memory_format=torch.channels_last)
        self.views_per_pass = numerics.extract_batch_size_cuda if device.type == 'cuda' else \
            numerics.extract_batch_size
        return self

    def use_flow_kernel(self, kernel):
        """Computes the flow's layers with `kernel` ('default': PyTorch's own; 'onednn': hardware.onednn_linear)."""
        self.nf.use_linear(onednn_linear if kernel == 'onednn' else F.linear)
        return self

    def autocast(self):
        """bfloat16 autocast on the model's device when its numerics ask for it, else a no-op context."""
        device_type = next(self.nf.parameters()).device.type
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16)

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

    def in_memory_format(self, views):
        """`views` in the memory format of the model's convolutions (channels-last or not): every path that
        runs AlexNet hands it views so, and rounds alike."""
        return views.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def extractor_digest(self):
        """sha256 of the AlexNet weights: identifies the extractor in feature-cache keys and checkpoints."""
        digest = hashlib.sha256()
        for name, tensor in self.feature_extractor.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


def build_model(model_settings):
    """DifferNet with the ImageNet weights the settings ask for; returns (model, weights_source)."""
    if not model_settings.pretrained:
        logger.info('!' * 78 + '\n!!! pretrained = False: AlexNet has RANDOM weights. '
                    'Scores are meaningless except in tests. !!!\n' + '!' * 78)
        return DifferNet(model_settings), 'random (pretrained = False)'
    state, source = load_imagenet_alexnet_features(model_settings.weights_path)
    return DifferNet(model_settings, state), source


# --- the score -------------------------------------------------------------------------------------------

def view_scores(z):
    """(N, D) -> (N,): each view's mean z^2 over the flow's dimensions (what the exported graph returns)."""
    return torch.mean(z ** 2, dim=-1)


def image_scores(z_views):
    """(N, n_views, D) -> (N,): an image's anomaly score, the mean of z^2 over its views and dimensions (the
    mean of its views' `view_scores`, up to float rounding)."""
    return torch.mean(z_views.float() ** 2, dim=(-2, -1))


def score_view_features(model, view_features, batch_size):
    """(anomaly score of each image (N,) numpy, test loss) from view features (N, n_views, D), `batch_size`
    images per flow pass, under the model's precision: the test loss is the mean over batches of the training
    loss, as the official evaluation. Puts the flow in eval mode."""
    model.eval()
    scores, losses = [], []
    with torch.no_grad(), model.autocast():
        for batch in view_features.split(batch_size):
            z, log_jac_det = model.nf(batch.reshape(-1, batch.shape[-1]))
            z, log_jac_det = z.float(), log_jac_det.float()
            losses.append(nll_loss(z, log_jac_det).reshape(1))
            scores.append(image_scores(z.view(*batch.shape)))
    # one copy to the host at the end, not a wait for the GPU per batch
    return torch.cat(scores).cpu().numpy(), float(np.mean(torch.cat(losses).double().cpu().numpy()))


# --- features of views and of sets of images --------------------------------------------------------------

def view_features(model, views, normalization=None):
    """Features (N, D) in float32 of views (N, 3, s, s), without gradient, `model.views_per_pass` views per
    AlexNet pass. uint8 views (MultiViewDataset.batch_pixels) are normalized with `normalization` = (mean,
    std) one pass at a time, the same values as normalizing them all first, without a float copy of them all."""
    features = []
    with torch.no_grad(), model.autocast():
        for chunk in views.split(model.views_per_pass):
            if chunk.dtype == torch.uint8:
                chunk = normalize_views(chunk, *normalization)
            # views normalized from PIL's pixels are channels-last already: no copy then
            features.append(model.features(model.in_memory_format(chunk)).float())
    return torch.cat(features)


def batch_features(model, loader, device):
    """Yields (features (B, n_views, D), labels (B,)) for each batch of a MultiViewDataset loader."""
    dataset = loader.dataset
    for batch, labels in loader:
        views = dataset.batch_pixels(batch, device)
        n_images, n_views = views.shape[:2]
        flat = views.view(-1, *views.shape[2:])
        features = view_features(model, flat, (dataset.norm_mean, dataset.norm_std))
        yield features.view(n_images, n_views, -1), labels


def dataset_features(model, loader, device, hide_bar=True, description=''):
    """Features (N_images, n_views, D) and labels (N_images,) of a whole dataset, in loader order."""
    features, labels = [], []
    batches = batch_features(model, loader, device)
    for batch, batch_labels in progress(batches, hide_bar, description, total=len(loader)):
        features.append(batch)
        labels.append(batch_labels)
    return torch.cat(features), torch.cat(labels).numpy()


def seeded_view_features(model, samples, n_views, view_seed, config, device, description, fixed_rotations=False,
                         images=None):
    """Features (N_images, n_views, D) of views drawn once from `view_seed`, from the disk cache when it holds
    exactly these files, settings, seed and weights; computed (and stored) otherwise. With `images` (RGB PIL
    images, one per sample, in memory) the views are made from them, never cached.

    Either way torch's global random stream is left as it was (a DataLoader draws its base seed from
    it even without workers), so training runs the same whether the features came from the cache."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        dataset = MultiViewDataset(samples, n_views, settings_group(config, 'views'), fixed_rotations=fixed_rotations, view_seed=view_seed,
                                   backend=view_backend(config.view_backend, device), images=images)
        key = None
        if config.feature_cache and images is None:
            key = feature_cache_key(samples, n_views, view_seed, fixed_rotations, model.extractor_digest(), config,
                                    device)
            cached = load_cached_features(config.feature_cache_dir, key)
            if cached is not None:
                logger.info(f'{description}: {len(samples)} images x {n_views} views from the feature cache')
                return cached[0].to(device), cached[1]
        started = time.time()
        loader = dataset_loader(dataset, max(1, model.views_per_pass // n_views), False, config.num_workers, device)
        features, labels = dataset_features(model, loader, device, config.hide_tqdm_bar, description)
        logger.info(f'{description}: extracted {len(samples)} images x {n_views} views in '
                    f'{time.time() - started:.1f} s')
        if key is not None:
            try:
                save_cached_features(config.feature_cache_dir, key, features, labels)
            except WriteFailed as error:
                logger.warning(f'warning: {error}; the run goes on without caching these features')
        return features, labels


def fixed_rotation_features(model, samples, settings, device, description, images=None):
    """Features (N, n_views, D) of `samples` at the fixed rotations, with the view seed of the test views
    (it matters only with colour jitter on), so that scores match a run with fixed_test_rotations: the
    checkpoint's reference scores and the images `--score` scores."""
    features, _ = seeded_view_features(model, samples, settings.n_transforms_test,
                                       settings.seed + TEST_VIEW_SEED_OFFSET, settings, device, description,
                                       fixed_rotations=True, images=images)
    return features


# --- checkpoints ----------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 'differnet-checkpoint'
CHECKPOINT_VERSION = 1



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
