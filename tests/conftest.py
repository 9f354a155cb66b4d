"""Shared test helpers: tiny configurations, tiny datasets, and where the reference files are."""
import glob
import os
import sys

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from base.logs import configure_logging  # noqa: E402
from base.settings import build_config  # noqa: E402

configure_logging()  # the project's messages reach stdout as in `python main.py` (capsys reads them)

# The official code's reference numbers ship with the tests; DIFFERNET_GOLDEN points every golden test at
# another folder of the same format (e.g. freshly regenerated ones).
GOLDEN_DIR = os.environ.get('DIFFERNET_GOLDEN', os.path.join(REPO_ROOT, 'tests', 'golden'))
# Real images are not shipped (MVTec AD's licence and size): tests that need them skip without them.
DATA_DIR = os.environ.get('DIFFERNET_DATA', os.path.join(REPO_ROOT, '..', 'shared', 'data'))


def require_data(relative_path):
    """DATA_DIR/relative_path, or a skip naming DIFFERNET_DATA when it is not on this machine."""
    path = os.path.join(DATA_DIR, relative_path)
    if not os.path.exists(path):
        pytest.skip(f'needs real images: {relative_path} not under {DATA_DIR} (set DIFFERNET_DATA to the folder '
                    f'holding mvtec/bottle)')
    return path


NO_CUDA = 'needs a CUDA device (benchmarks/gpu_check.py runs these there)'


def cuda(test):
    """Marks a test `cuda` (pytest -m cuda selects them) and skips it, with the reason, without CUDA."""
    import torch
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)(test))


def tiny_config(**overrides):
    """A configuration small enough for a CPU test: 1 scale of 64 px, a 2-block flow of width 32."""
    values = dict(img_size=64, n_scales=1, n_coupling_blocks=2, fc_internal=32, meta_epochs=1,
                  sub_epochs=1, n_transforms=2, n_transforms_test=2, batch_size=4, batch_size_test=2,
                  extract_batch_size=8, pretrained=False, device='cpu', verbose=False, adam_fused=False)
    values.update(overrides)
    return build_config(**values)


def read_repo_file(relative_path):
    """The text of a file of the repository."""
    with open(os.path.join(REPO_ROOT, relative_path)) as handle:
        return handle.read()


def doc_names():
    """README.md and every docs/*.md page, as paths relative to the repository."""
    return ['README.md'] + sorted(os.path.relpath(path, REPO_ROOT)
                                  for path in glob.glob(os.path.join(REPO_ROOT, 'docs', '*.md')))


def write_image(path, color=(128, 128, 128), size=(40, 40), mode='RGB'):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def official_tree(tmp_path):
    """<root>/widget/{train/good, test/good, test/scratch, test/dent} with 3, 2, 2, 1 plain images."""
    root = tmp_path / 'data'
    rng = np.random.RandomState(0)
    counts = {'train/good': 3, 'test/good': 2, 'test/scratch': 2, 'test/dent': 1}
    for folder, count in counts.items():
        for i in range(count):
            color = tuple(int(v) for v in rng.randint(0, 255, size=3))
            write_image(str(root / 'widget' / folder / f'{i:03d}.png'), color)
    return root


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    """The drawn demo set (image_data/demo_data.py) in a fresh folder: <root>/demo_washer/{train,test}/..."""
    from image_data.demo_data import generate_demo_dataset
    root = tmp_path_factory.mktemp('demo')
    generate_demo_dataset(str(root))
    return str(root)


@pytest.fixture(scope='session')
def imagenet_state():
    """The real ImageNet AlexNet `features` weights, from wherever this machine can get them; a skip when
    it can get none (offline, empty cache). A digest mismatch is not a skip: it fails."""
    from base.alexnet_weights import load_imagenet_alexnet_features
    from base.errors import UserError
    try:
        state, _ = load_imagenet_alexnet_features()
    except UserError as error:
        if str(error).startswith('no ImageNet AlexNet weights could be obtained'):
            pytest.skip('needs the ImageNet AlexNet weights, which this machine cannot get '
                        '(docs/troubleshooting.md, "ImageNet weights without internet")')
        raise
    return state


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA device; skipped with the reason without one '
                                       '(benchmarks/gpu_check.py runs `pytest -m cuda`)')
