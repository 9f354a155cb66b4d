"""The --export command: a trained DifferNet's scoring path as one ONNX graph, written by PyTorch's
torch.export-based exporter, and the JSON beside it with what a runtime needs to make the views, average
them into an image's score and decide, with a threshold taken from the graph's own scores.

    python main.py --export bottle.onnx --checkpoint results/RUN/bottle_checkpoint.pt

The graph: views (N, 3, img_size, img_size) float32 in, each view's mean z^2 out (N dynamic), in float32
whatever precision the run trained in. deployment/onnx_scoring_example.py scores images with it without
PyTorch.
"""
import json
import logging
import os
import time

import numpy as np
import onnxruntime
import torch

from base.atomic_files import file_sha256, replace_atomically, write_text_atomic
from base.errors import UserError
from base.settings import settings_group
from base.thresholds import decision_threshold, score_normalization, score_statistics
from deployment.scoring import Scorer
from image_data.image_files import Sample
from model import TEST_VIEW_SEED_OFFSET, view_features, view_scores
from utils import MultiViewDataset, fixed_angles

logger = logging.getLogger(__name__)

OPSET = 18  # the opset the exporter's operator library (onnxscript's torchlib) is written in: no conversion
EXPORTER = 'torch.onnx.export(dynamo=True): the torch.export-based exporter'
INPUT_NAME, OUTPUT_NAME = 'views', 'view_scores'
EXPORT_FORMAT = 'differnet-onnx'
EXPORT_VERSION = 2
CHECK_BATCHES = (1, 3, 5)  # the export's own check runs these batch sizes in onnxruntime
VIEWS_HOW = ('decode; 16-bit grayscale to 8 bits (/ 257, rounded), then convert to RGB (alpha dropped); resize '
             'to img_size x img_size with PIL bilinear (torchvision Resize); rotate counter-clockwise about the '
             'centre by each angle with PIL NEAREST (fill 0, same size); then per channel, in float32, '
             '(pixel / 255 - mean) / std')


class ViewScores(torch.nn.Module):
    """views (N, 3, s, s) -> (N,): each view's mean z^2 over the flow's dimensions (model.view_scores); an
    image's anomaly score is the mean of its n_transforms_test views' (model.image_scores)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, views):
        z, _ = self.model(views)
        return view_scores(z)


def write_onnx(wrapper, example, onnx_path):
    """`onnx_path` (written whole) from torch.export's graph of `wrapper` at `example`, the batch dimension
    dynamic, the weights inside the one file."""
    batch = torch.export.Dim('N', min=1)
    program = torch.onnx.export(wrapper, (example,), dynamo=True, opset_version=OPSET, verbose=False,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes={INPUT_NAME: {0: batch}})
    replace_atomically(onnx_path, lambda part: program.save(part, external_data=False))


def relative_difference(got, expected):
    """The largest |got - expected| / |expected| over the entries."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(got - expected) / np.maximum(np.abs(expected), 1e-12)))


def checkpoint_view_scores(model, views):
    """Each view's mean z^2 as the checkpoint's own numerics compute it (its precision, memory format and
    kernel, on its device): what Scorer's scores are made of."""
    with torch.no_grad(), model.autocast():
        z, _ = model.nf(view_features(model, views))
    return view_scores(z.float()).cpu().numpy()


def check_views(size):
    """Random views for the export's check, one batch of each of CHECK_BATCHES sizes."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, 3, size, size, generator=generator) for n in CHECK_BATCHES]


def export_onnx(config, checkpoint_path, onnx_path, threshold=None):
    """Writes `onnx_path` and `<onnx_path without .onnx>.json` from the checkpoint; checks in onnxruntime that
    the graph scores batches of 1, 3 and 5 views as PyTorch does in float32 (1e-4 relative); returns the JSON."""
    if not onnx_path.endswith('.onnx'):
        raise UserError(f'--export {onnx_path}: the file name must end in .onnx, e.g. --export bottle.onnx')
    scorer = Scorer(checkpoint_path, config, threshold)
    batches = check_views(scorer.settings.img_size)
    own = np.concatenate([checkpoint_view_scores(scorer.model, views.to(scorer.device)) for views in batches])
    model = scorer.model.to('cpu').use_flow_kernel('default').eval()  # plain products: ONNX MatMul
    wrapper = ViewScores(model).eval()
    os.makedirs(os.path.dirname(os.path.abspath(onnx_path)), exist_ok=True)
    started = time.perf_counter()
    write_onnx(wrapper, batches[0], onnx_path)
    seconds = time.perf_counter() - started
    session = onnx_session(onnx_path)
    got = np.concatenate([run_session(session, views.numpy()) for views in batches])
    with torch.no_grad():
        expected = np.concatenate([wrapper(views).numpy() for views in batches])
    error = relative_difference(got, expected)
    if error > 1e-4:
        raise RuntimeError(f'the exported {onnx_path} scores views {error:.1e} apart from PyTorch (relative)')
    logger.info(f'Exported {onnx_path} ({os.path.getsize(onnx_path) / 1e6:.1f} MB, {EXPORTER}, opset {OPSET}, '
                f'{seconds:.1f} s); onnxruntime scores batches of 1, 3 and 5 views as PyTorch does in float32 '
                f'(max relative difference {error:.1e})')
    decision = graph_decision(scorer, session, config, threshold, relative_difference(got, own))
    decision['numerics']['graph_vs_pytorch_float32'] = error
    description = export_description(scorer, onnx_path, decision)
    json_path = os.path.splitext(onnx_path)[0] + '.json'
    write_text_atomic(json_path, json.dumps(description, indent=2))
    logger.info(f"threshold {description['threshold']:.6g}: {description['threshold_origin']}; wrote {json_path}")
    return description


def reference_root(checkpoint_path, config, reference_scores):
    """The folder the checkpoint's reference images are found in (their files are stored relative to the
    training run's dataset_path): --dataset_path, else the dataset_path of results.json beside the
    checkpoint; None when neither holds them all, or there are none."""
    files = [name for stats in (reference_scores or {}).values() if stats for name in stats['files']]
    if not files:
        return None
    candidates = [config.dataset_path]
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), 'results.json')) as handle:
            candidates.append(json.load(handle)['config']['dataset_path'])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a checkpoint moved away from its run: --dataset_path alone
    for root in candidates:
        if root and all(os.path.isfile(os.path.join(root, name)) for name in files):
            return os.path.abspath(root)
    return None


def graph_image_scores(session, samples, settings):
    """Each image's score from the graph: the mean of its views' scores, the views made as Scorer makes them
    (fixed rotations, the test views' seed)."""
    dataset = MultiViewDataset(samples, settings.n_transforms_test, settings_group(settings, 'views'),
                               fixed_rotations=True, view_seed=settings.seed + TEST_VIEW_SEED_OFFSET)
    return [float(np.mean(run_session(session, dataset.views_of(index, torch.device('cpu')).numpy())))
            for index in range(len(dataset))]


def graph_reference_scores(session, reference_scores, root, settings):
    """(the checkpoint's reference statistics with every image rescored by the graph, the largest relative
    difference between the graph's scores and the checkpoint's own of the same images)."""
    rescored, largest = {}, 0.0
    for name, stats in reference_scores.items():
        if not stats:
            rescored[name] = stats
            continue
        samples = [Sample(os.path.join(root, file), 0, '') for file in stats['files']]
        scores = graph_image_scores(session, samples, settings)
        largest = max(largest, relative_difference(scores, stats['scores']))
        rescored[name] = score_statistics(scores, stats['files'])
    return rescored, largest


def graph_decision(scorer, session, config, explicit, views_difference):
    """The JSON's threshold, threshold_origin and normalized_score, from the graph's own scores of the
    checkpoint's reference images where they are found (else the checkpoint's, Scorer's), and its
    'numerics': the graph's precision and the checkpoint's, and the differences measured between them."""
    precision = 'bfloat16 autocast' if scorer.model.bf16 else 'float32'
    numerics = {'graph': 'float32', 'checkpoint': precision, 'graph_vs_checkpoint_on_random_views': views_difference}
    decision = {'threshold': scorer.threshold, 'threshold_origin': scorer.threshold_origin,
                'normalization': scorer.normalization, 'numerics': numerics}
    reference = scorer.checkpoint['reference_scores']
    if not any((reference or {}).values()):
        numerics['reference_scores'] = 'none: the checkpoint holds no scores of defect-free images'
        return decision
    root = reference_root(scorer.checkpoint_path, config, reference)
    if root is None:
        numerics['reference_scores'] = (f"the checkpoint's ({precision}): its reference images are not under "
                                        f"--dataset_path {config.dataset_path} nor the run's dataset_path")
        if scorer.model.bf16 and explicit is None:
            logger.warning(f"warning: the threshold is the checkpoint's, from bfloat16 scores, which differ from "
                           f"this float32 graph's by up to {views_difference:.1e} (relative, on random views); give "
                           f'--dataset_path of the training run to rescore its reference images with the graph')
        return decision
    n_images = sum(stats['n'] for stats in reference.values() if stats)
    logger.info(f"rescoring the checkpoint's {n_images} reference images under {root} with the graph, for a "
                f'threshold in its own numerics')
    started = time.perf_counter()
    rescored, difference = graph_reference_scores(session, reference, root, scorer.settings)
    logger.info(f"rescored in {time.perf_counter() - started:.1f} s; the graph's scores of them differ from the "
                f"checkpoint's ({precision}) by up to {difference:.1e} (relative)")
    numerics['reference_scores'] = f"this graph's: the checkpoint's {n_images} reference images under {root}, rescored"
    numerics['graph_vs_checkpoint_on_reference_images'] = difference
    threshold, origin = decision_threshold(rescored, config.threshold_fpr, explicit, scorer.checkpoint_path)
    decision.update(threshold=threshold, threshold_origin=origin if explicit is not None else
                    f'{origin}, as this graph scores them', normalization=score_normalization(rescored, threshold))
    return decision


def export_description(scorer, onnx_path, decision):
    """The JSON beside the model: its exporter, input and output, how to make the views and the score from
    them, the threshold and the 0..1 scale of `decision` (graph_decision) with the numerics they come from,
    and the model file's sha256."""
    settings = scorer.settings
    return {
        'format': EXPORT_FORMAT, 'version': EXPORT_VERSION, 'exporter': EXPORTER, 'opset': OPSET,
        'torch': torch.__version__,
        'model_file': os.path.basename(onnx_path), 'model_sha256': file_sha256(onnx_path),
        'class_name': scorer.checkpoint['class_name'], 'checkpoint': os.path.abspath(scorer.checkpoint_path),
        'input': {'name': INPUT_NAME, 'shape': ['N', 3, settings.img_size, settings.img_size], 'dtype': 'float32',
                  'layout': 'NCHW, RGB'},
        'output': {'name': OUTPUT_NAME, 'shape': ['N'], 'meaning': "each view's mean z^2"},
        'views': {'per_image': settings.n_transforms_test, 'angles_degrees': fixed_angles(settings.n_transforms_test),
                  'how': VIEWS_HOW, 'norm_mean': list(settings.norm_mean), 'norm_std': list(settings.norm_std),
                  'colour_jitter': [settings.transf_brightness, settings.transf_contrast, settings.transf_saturation]},
        'image_score': f'raw = mean of the {settings.n_transforms_test} view scores of an image',
        'threshold': decision['threshold'], 'threshold_origin': decision['threshold_origin'],
        'decision': 'anomalous when raw > threshold',
        'normalized_score': {'formula': 'score = 1 / (1 + (threshold / raw) ** exponent)', **decision['normalization']},
        'numerics': decision['numerics'],
    }


def onnx_session(onnx_path):
    return onnxruntime.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])


def run_session(session, views):
    """Each view's mean z^2 from an onnxruntime session of the exported model."""
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(views, dtype=np.float32)})[0]


def check_description(description_path, onnx_path):
    """Raises UserError unless the JSON describes this model file (format and sha256)."""
    try:
        with open(description_path) as handle:
            description = json.load(handle)
    except (OSError, ValueError) as error:
        raise UserError(f'{description_path} cannot be read as an export description ({type(error).__name__}); '
                        f'export again with --export') from None
    if description.get('format') != EXPORT_FORMAT:
        raise UserError(f'{description_path} is not a DifferNet export description; export again with --export')
    if description.get('model_sha256') != file_sha256(onnx_path):
        raise UserError(f'{description_path} does not describe {onnx_path} (its sha256 differs); keep the .onnx and '
                        f'the .json of one export together, or export again')
    return description


def export_command(config, args):
    if not args.checkpoint:
        raise UserError('--export FILE needs --checkpoint FILE, e.g. --export bottle.onnx --checkpoint '
                        'results/RUN/bottle_checkpoint.pt')
    export_onnx(config, args.checkpoint, args.export, threshold=args.threshold)
