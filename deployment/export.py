"""Export a trained DifferNet to ONNX, so that a machine that only scores needs neither this repository nor
PyTorch: the scoring path (the multi-scale AlexNet and the flow) as one graph, a batch of normalized views
(N, 3, img_size, img_size) in, each view's mean z^2 out (N dynamic), and a JSON beside it with what a
caller needs to make the views, average them into an image's score and decide.

    python main.py --export bottle.onnx --checkpoint results/RUN/bottle_checkpoint.pt

Exporter: torch.onnx.export, the TorchScript-based exporter (dynamo=False), ONNX opset 17.
"""
import json
import logging
import os

import numpy as np
import onnxruntime
import torch

from base.atomic_files import file_sha256, replace_atomically, write_text_atomic
from base.errors import UserError
from deployment.scoring import Scorer
from model import view_scores
from utils import fixed_angles

logger = logging.getLogger(__name__)

OPSET = 17
EXPORTER = f'torch.onnx.export (TorchScript-based, dynamo=False), opset {OPSET}'
INPUT_NAME, OUTPUT_NAME = 'views', 'view_scores'
EXPORT_FORMAT = 'differnet-onnx'
EXPORT_VERSION = 1


class ViewScores(torch.nn.Module):
    """views (N, 3, s, s) -> (N,): each view's mean z^2 over the flow's dimensions (model.view_scores); an
    image's anomaly score is the mean of its n_transforms_test views' (model.image_scores)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, views):
        z, _ = self.model(views)
        return view_scores(z)


def export_description(scorer, onnx_path):
    """The JSON beside the model: its input and output, how to make the views and the score from them,
    the threshold and the 0..1 scale (scoring.score_normalization), and the model file's sha256."""
    settings = scorer.settings
    return {
        'format': EXPORT_FORMAT, 'version': EXPORT_VERSION, 'exporter': EXPORTER,
        'model_file': os.path.basename(onnx_path), 'model_sha256': file_sha256(onnx_path),
        'class_name': scorer.checkpoint['class_name'], 'checkpoint': os.path.abspath(scorer.checkpoint_path),
        'input': {'name': INPUT_NAME, 'shape': ['N', 3, settings.img_size, settings.img_size], 'dtype': 'float32',
                  'layout': 'NCHW, RGB'},
        'output': {'name': OUTPUT_NAME, 'shape': ['N'], 'meaning': "each view's mean z^2"},
        'views': {'per_image': settings.n_transforms_test, 'angles_degrees': fixed_angles(settings.n_transforms_test),
                  'how': ('decode, convert to RGB, resize to img_size x img_size with PIL bilinear '
                          '(torchvision Resize), rotate counter-clockwise about the centre by each angle with '
                          'PIL NEAREST (fill 0, same size), then per channel (pixel / 255 - mean) / std'),
                  'norm_mean': list(settings.norm_mean), 'norm_std': list(settings.norm_std),
                  'colour_jitter': [settings.transf_brightness, settings.transf_contrast, settings.transf_saturation]},
        'image_score': f'raw = mean of the {settings.n_transforms_test} view scores of an image',
        'threshold': scorer.threshold, 'threshold_origin': scorer.threshold_origin,
        'decision': 'anomalous when raw > threshold',
        'normalized_score': {'formula': 'score = 1 / (1 + (threshold / raw) ** exponent)', **scorer.normalization},
    }


def export_onnx(config, checkpoint_path, onnx_path):
    """Writes `onnx_path` and `<onnx_path without .onnx>.json` from the checkpoint; checks with onnxruntime
    that the exported graph scores two views as PyTorch does (1e-4 relative) and returns the JSON dict."""
    if not onnx_path.endswith('.onnx'):
        raise UserError(f'--export {onnx_path}: the file name must end in .onnx, e.g. --export bottle.onnx')
    scorer = Scorer(checkpoint_path, config)
    model = scorer.model.to('cpu').use_flow_kernel('default').eval()  # plain products: ONNX MatMul
    wrapper = ViewScores(model).eval()
    size = scorer.settings.img_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    os.makedirs(os.path.dirname(os.path.abspath(onnx_path)), exist_ok=True)

    def write(part):
        torch.onnx.export(wrapper, (example,), part, dynamo=False, opset_version=OPSET, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: 'N'}, OUTPUT_NAME: {0: 'N'}})
    replace_atomically(onnx_path, write)
    with torch.no_grad():
        expected = wrapper(example).numpy()
    got = onnx_scores(onnx_path, example.numpy())
    error = float(np.max(np.abs(got - expected) / np.maximum(np.abs(expected), 1e-12)))
    if error > 1e-4:
        raise RuntimeError(f'the exported {onnx_path} scores views {error:.1e} apart from PyTorch (relative)')
    description = export_description(scorer, onnx_path)
    json_path = os.path.splitext(onnx_path)[0] + '.json'
    write_text_atomic(json_path, json.dumps(description, indent=2))
    logger.info(f'Exported {onnx_path} ({os.path.getsize(onnx_path) / 1e6:.1f} MB, {EXPORTER}) and {json_path}; '
        f'onnxruntime scores views as PyTorch does (max relative difference {error:.1e})')
    return description


def onnx_scores(onnx_path, views):
    """Each view's mean z^2 from the exported model in onnxruntime (CPU)."""
    session = onnxruntime.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
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
    export_onnx(config, args.checkpoint, args.export)
