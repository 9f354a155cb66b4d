"""The ONNX export: written by the torch.export-based exporter without a warning, scoring real images as PyTorch
does in onnxruntime (and OpenVINO where it is installed), a threshold from the graph's own numerics, and
scoring without PyTorch by deployment/onnx_scoring_example.py as docs/usage.md shows it."""
import csv
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from base.errors import UserError
from base.thresholds import normalized_scores, threshold_at_fpr
from conftest import DATA_DIR, REPO_ROOT
from deployment.export import (ViewScores, check_description, checkpoint_view_scores, graph_image_scores,
                               onnx_session, run_session)
from deployment.scoring import Scorer
from image_data.image_files import Sample
from image_data.layouts import find_class_samples
from main import main
from utils import MultiViewDataset

# two scales (the second through the graph's nearest-neighbour Resize), 4 fixed views per image
TINY = ['--pretrained', 'false', '--img_size', '128', '--n_scales', '2', '--fc_internal', '16',
        '--n_coupling_blocks', '2', '--meta_epochs', '1', '--sub_epochs', '1', '--n_transforms', '2',
        '--n_transforms_test', '4', '--device', 'cpu', '--feature_cache', 'false']
ALL_WARNINGS = ['-W', 'always::DeprecationWarning', '-W', 'always::FutureWarning']


def train(demo_root, out, *options):
    assert main(['--dataset_path', str(demo_root), '--class_name', 'demo_washer', '--results_dir', str(out), *TINY,
                 *options]) == 0
    return str(out / 'demo_washer_checkpoint.pt')


@pytest.fixture(scope='module')
def exported(demo_root, tmp_path_factory):
    """(checkpoint, .onnx path, its JSON, the export's stdout and stderr): a tiny float32 model trained on the
    drawn demo set, exported by `python main.py --export` in a process that shows every DeprecationWarning and
    FutureWarning, started elsewhere than the repository (the reference images are found through the run's
    results.json)."""
    checkpoint = train(demo_root, tmp_path_factory.mktemp('run'))
    folder = tmp_path_factory.mktemp('exported')
    onnx_path = str(folder / 'washer.onnx')
    done = subprocess.run([sys.executable, *ALL_WARNINGS, os.path.join(REPO_ROOT, 'main.py'), '--export', onnx_path,
                           '--checkpoint', checkpoint, '--device', 'cpu'], cwd=str(folder), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return checkpoint, onnx_path, check_description(str(folder / 'washer.json'), onnx_path), done.stdout, done.stderr


@pytest.fixture(scope='module')
def images(demo_root):
    """Real images to score: the demo set's test images (good and defective), and MVTec AD bottle test images
    where they are on this machine."""
    _, test = find_class_samples(str(demo_root), 'demo_washer')
    paths = [sample.path for sample in test]
    bottle = os.path.join(DATA_DIR, 'mvtec')
    if os.path.isdir(os.path.join(bottle, 'bottle')):
        paths += [sample.path for sample in find_class_samples(bottle, 'bottle')[1][::40]]
    return paths


def test_the_export_is_torch_exports_with_a_dynamic_batch_and_no_warning(exported):
    _, onnx_path, description, stdout, stderr = exported
    warned = [line for line in stderr.splitlines() if 'DeprecationWarning' in line or 'FutureWarning' in line]
    assert not warned, stderr
    assert 'onnxruntime scores batches of 1, 3 and 5 views as PyTorch does' in stdout
    assert 'dynamo=True' in description['exporter'] and 'torch.export' in description['exporter']
    assert description['opset'] >= 18 and description['torch'] == torch.__version__
    model = onnx.load(onnx_path)
    assert {entry.domain: entry.version for entry in model.opset_import}[''] == description['opset']
    assert [dim.dim_param for dim in model.graph.input[0].type.tensor_type.shape.dim][0] == 'N'
    assert not [name for name in os.listdir(os.path.dirname(onnx_path)) if name.endswith('.data')]  # one file
    assert description['input']['shape'] == ['N', 3, 128, 128] and description['views']['per_image'] == 4
    assert description['views']['angles_degrees'] == [0.0, 90.0, 180.0, 270.0]


def test_onnxruntime_runs_batches_of_1_3_and_5_views_as_pytorch_does(exported, images):
    checkpoint, onnx_path, _, _, _ = exported
    scorer = Scorer(checkpoint)
    dataset = MultiViewDataset([Sample(path, -1, '') for path in images[:2]], 4, scorer.settings,
                               fixed_rotations=True)
    views = torch.cat([dataset.views_of(index, torch.device('cpu')) for index in range(2)])
    session = onnx_session(onnx_path)
    float32 = ViewScores(scorer.model.to('cpu')).eval()
    for n in (1, 3, 5):
        got = run_session(session, views[:n].numpy())
        assert got.shape == (n,)
        assert got == pytest.approx(checkpoint_view_scores(scorer.model, views[:n]), rel=1e-4)
        with torch.no_grad():
            assert got == pytest.approx(float32(views[:n]).numpy(), rel=1e-4)


def test_onnx_scores_real_images_as_pytorch_does_and_decides_alike(exported, images):
    checkpoint, onnx_path, description, _, _ = exported
    expected = Scorer(checkpoint).score(images)
    samples = [Sample(path, -1, '') for path in images]
    got = graph_image_scores(onnx_session(onnx_path), samples, Scorer(checkpoint).settings)
    assert got == pytest.approx([result.raw for result in expected], rel=1e-4)
    scores = normalized_scores(got, description['normalized_score'])
    assert scores == pytest.approx([result.score for result in expected], abs=1e-3)
    labels = scores > 0.5
    assert list(labels) == [result.anomalous for result in expected]
    assert list(np.asarray(got) > description['threshold']) == list(labels)
    assert len(set(labels[:9])) == 2  # the demo's test images: some called good, some anomalous


def test_the_thresholds_of_the_json_are_the_graphs_own(exported, demo_root):
    checkpoint, onnx_path, description, _, _ = exported
    reference = torch.load(checkpoint, weights_only=True)['reference_scores']['training']
    samples = [Sample(os.path.join(str(demo_root), name), 0, '') for name in reference['files']]
    scorer = Scorer(checkpoint)
    rescored = graph_image_scores(onnx_session(onnx_path), samples, scorer.settings)
    assert description['threshold'] == threshold_at_fpr(rescored, scorer.settings.threshold_fpr)
    assert description['threshold'] == pytest.approx(scorer.threshold, rel=1e-5)  # float32 both: one rounding apart
    numerics = description['numerics']
    assert numerics['graph'] == numerics['checkpoint'] == 'float32'
    assert numerics['reference_scores'].startswith("this graph's: the checkpoint's 6 reference images under")
    assert 0 <= numerics['graph_vs_checkpoint_on_reference_images'] < 1e-5 and 'as this graph scores them' in \
        description['threshold_origin']


@pytest.fixture(scope='module')
def bf16_checkpoint(demo_root, tmp_path_factory):
    return train(demo_root, tmp_path_factory.mktemp('bf16_run'), '--bf16_autocast', 'true')


def test_a_bfloat16_checkpoint_gets_the_threshold_of_its_float32_graph(bf16_checkpoint, demo_root, tmp_path):
    onnx_path = tmp_path / 'bf16.onnx'
    assert main(['--export', str(onnx_path), '--checkpoint', bf16_checkpoint, '--device', 'cpu']) == 0
    description = json.loads(onnx_path.with_suffix('.json').read_text())
    scorer = Scorer(bf16_checkpoint)
    reference = scorer.checkpoint['reference_scores']['training']
    samples = [Sample(os.path.join(str(demo_root), name), 0, '') for name in reference['files']]
    rescored = graph_image_scores(onnx_session(str(onnx_path)), samples, scorer.settings)
    assert description['threshold'] == threshold_at_fpr(rescored, scorer.settings.threshold_fpr)
    assert description['threshold'] != scorer.threshold  # the checkpoint's own, in bfloat16, is another
    numerics = description['numerics']
    assert numerics['graph'] == 'float32' and numerics['checkpoint'] == 'bfloat16 autocast'
    measured = max(abs(a - b) / b for a, b in zip(rescored, reference['scores']))
    assert numerics['graph_vs_checkpoint_on_reference_images'] == pytest.approx(measured, rel=1e-6)
    assert measured > 1e-5  # bfloat16 rounds visibly: what the JSON says is not a formality


def test_a_bfloat16_checkpoint_away_from_its_images_keeps_its_threshold_and_says_how_far_off(bf16_checkpoint,
                                                                                            tmp_path, capsys):
    moved = tmp_path / 'moved' / 'washer.pt'  # no results.json beside it, the images not under --dataset_path
    moved.parent.mkdir()
    shutil.copy(bf16_checkpoint, moved)
    onnx_path = tmp_path / 'bf16.onnx'
    assert main(['--export', str(onnx_path), '--checkpoint', str(moved), '--device', 'cpu',
                 '--dataset_path', str(tmp_path)]) == 0
    assert 'warning: the threshold is the checkpoint' in capsys.readouterr().out
    description = json.loads(onnx_path.with_suffix('.json').read_text())
    scorer = Scorer(str(moved))
    assert description['threshold'] == scorer.threshold
    assert description['normalized_score']['exponent'] == scorer.normalization['exponent']
    numerics = description['numerics']
    assert numerics['reference_scores'].startswith("the checkpoint's (bfloat16 autocast): its reference images are "
                                                   'not under')
    assert 'graph_vs_checkpoint_on_reference_images' not in numerics
    assert numerics['graph_vs_checkpoint_on_random_views'] > 1e-5 > numerics['graph_vs_pytorch_float32']


def usage_example_command():
    """The command line docs/usage.md shows for the torch-free example, as words."""
    text = open(os.path.join(REPO_ROOT, 'docs', 'usage.md')).read()
    line = re.search(r'^python deployment/onnx_scoring_example\.py .*$', text, flags=re.M).group(0)
    return shlex.split(line)


def test_the_example_of_usage_md_scores_a_folder_without_torch(exported, images, tmp_path):
    checkpoint, onnx_path, _, _, _ = exported
    blocker = tmp_path / 'no_torch' / 'torch'
    blocker.mkdir(parents=True)
    (blocker / '__init__.py').write_text("raise ImportError('torch is not installed here')\n")
    env = dict(os.environ, PYTHONPATH=str(blocker.parent))
    blocked = subprocess.run([sys.executable, '-c', 'import torch'], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and 'torch is not installed here' in blocked.stderr
    words = usage_example_command()
    assert words[:3] == ['python', 'deployment/onnx_scoring_example.py', 'bottle.onnx']
    folder = tmp_path / words[3].rstrip('/')
    folder.mkdir()
    names = [f'{index:03d}{os.path.splitext(path)[1]}' for index, path in enumerate(images)]
    for name, path in zip(names, images):
        shutil.copy(path, folder / name)
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, words[1]), onnx_path, *words[3:]], env=env,
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [os.path.basename(row['file']) for row in rows] == names
    expected = Scorer(checkpoint).score(images)
    assert [float(row['raw_score']) for row in rows] == pytest.approx([result.raw for result in expected], rel=1e-4)
    assert [row['decision'] == 'anomalous' for row in rows] == [result.anomalous for result in expected]
    samples = [Sample(path, -1, '') for path in images]
    graph = graph_image_scores(onnx_session(onnx_path), samples, Scorer(checkpoint).settings)
    assert [float(row['raw_score']) for row in rows] == pytest.approx(graph, rel=1e-6)  # the same views


def test_openvino_reads_the_onnx_file_directly(exported, images):
    openvino = pytest.importorskip('openvino')
    checkpoint, onnx_path, _, _, _ = exported
    dataset = MultiViewDataset([Sample(images[0], -1, '')], 4, Scorer(checkpoint).settings, fixed_rotations=True)
    views = dataset.views_of(0, torch.device('cpu')).numpy()[:3]
    compiled = openvino.Core().compile_model(openvino.Core().read_model(onnx_path), 'CPU')
    got = np.asarray(compiled(views)[compiled.output(0)])
    assert got == pytest.approx(run_session(onnx_session(onnx_path), views), rel=1e-4)


def test_an_export_description_that_does_not_match_its_model_is_refused(exported, tmp_path):
    checkpoint, onnx_path, _, _, _ = exported
    json_path = os.path.splitext(onnx_path)[0] + '.json'
    other = tmp_path / 'b.onnx'
    other.write_bytes(open(onnx_path, 'rb').read() + b'\0')
    with pytest.raises(UserError, match='does not describe .*b.onnx'):
        check_description(json_path, str(other))
    (tmp_path / 'bad.json').write_text('{"format": "something"}')
    with pytest.raises(UserError, match='is not a DifferNet export description'):
        check_description(str(tmp_path / 'bad.json'), onnx_path)
    assert main(['--export', str(tmp_path / 'x.txt'), '--checkpoint', checkpoint]) == 2
    assert main(['--export', str(tmp_path / 'x.onnx'), '--checkpoint', str(tmp_path / 'bad.json')]) == 2
