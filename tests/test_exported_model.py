"""A trained model put to work: scores on 0..1, scoring from Python (the ONNX export: test_onnx_export.py)."""
import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import DATA_DIR, REPO_ROOT
from base.errors import UserError
from main import main
from deployment.scoring import Scorer
from base.thresholds import normalized_scores, score_normalization
from image_data.layouts import find_class_samples

TINY = ['--pretrained', 'false', '--img_size', '64', '--n_scales', '1', '--fc_internal', '16',
        '--n_coupling_blocks', '2', '--meta_epochs', '1', '--sub_epochs', '1', '--n_transforms', '2',
        '--n_transforms_test', '4', '--device', 'cpu', '--feature_cache', 'false']


@pytest.fixture(scope='module')
def trained(demo_root, tmp_path_factory):
    """(checkpoint path, images to score): a tiny model trained on the drawn demo set; the images are real
    MVTec AD bottle test images where they are on this machine, else the demo set's test images."""
    out = tmp_path_factory.mktemp('run')
    assert main(['--dataset_path', demo_root, '--class_name', 'demo_washer', '--results_dir', str(out), *TINY]) == 0
    bottle = os.path.join(DATA_DIR, 'mvtec')
    if os.path.isdir(os.path.join(bottle, 'bottle')):
        _, test = find_class_samples(bottle, 'bottle')
        images = [sample.path for sample in test[::20]]  # good and defective ones
    else:
        _, test = find_class_samples(demo_root, 'demo_washer')
        images = [sample.path for sample in test]
    return str(out / 'demo_washer_checkpoint.pt'), images


def test_scores_on_0_to_1_are_monotone_with_the_threshold_at_one_half():
    reference = {'training': {'quantiles': {'0.5': 1.1}}, 'validation': None}
    normalization = score_normalization(reference, 1.3)
    raw = [0.5, 1.1, 1.3, 2.0, 4e11, 1e12]
    scores = normalized_scores(raw, normalization)
    assert list(scores) == sorted(scores) and scores[2] == pytest.approx(0.5)
    assert scores[1] == pytest.approx(0.25)  # the median defect-free score
    assert 0 < scores[0] < 0.25 and scores[-1] == pytest.approx(1.0) and np.all((scores >= 0) & (scores <= 1))
    assert score_normalization({'training': None, 'validation': None}, 2.0) == {'threshold': 2.0, 'exponent': 1.0}


def test_scoring_from_python_takes_paths_pil_images_and_arrays(trained):
    checkpoint, images = trained
    scorer = Scorer(checkpoint)
    pil = Image.open(images[0])
    gray = np.asarray(Image.open(images[1]).convert('L'))
    results = scorer.score([images[0], pil, np.asarray(pil.convert('RGB')), gray], maps=True)
    assert results[0].raw == pytest.approx(results[1].raw, rel=1e-6) == pytest.approx(results[2].raw, rel=1e-6)
    assert results[1].name == '<image 1>' and results[0].name == images[0]
    assert all(0 <= result.score <= 1 and result.gradient_map.shape == (64, 64) for result in results)
    with pytest.raises(UserError, match='uint8'):
        scorer.score([np.zeros((8, 8), dtype=np.float32)])
    with pytest.raises(UserError, match='cannot read image .*missing.png'):
        scorer.score(['missing.png'])


def test_the_python_example_of_usage_md_runs(trained, tmp_path, monkeypatch):
    checkpoint, images = trained
    text = open(os.path.join(REPO_ROOT, 'docs', 'usage.md')).read()
    example = re.search(r'## Scoring from Python\n.*?```python\n(.*?)```', text, flags=re.S).group(1)
    assert len(example.strip().splitlines()) <= 6
    printed = []
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'part_001.png').write_bytes(open(images[0], 'rb').read())
    code = example.replace("'results/RUN/bottle_checkpoint.pt'", repr(checkpoint))
    exec(compile(code, 'usage.md', 'exec'), {'print': lambda *values: printed.append(values)})
    assert [values[0] for values in printed] == ['part_001.png', '<image 1>']
    assert all(isinstance(values[1], float) and 0 <= values[2] <= 1 for values in printed)
