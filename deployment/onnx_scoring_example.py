"""Scoring images with an exported DifferNet using onnxruntime, numpy and Pillow only (no PyTorch, nothing of
this repository): copy this file, the .onnx and its .json to the machine that inspects parts.

    python onnx_scoring_example.py bottle.onnx new_parts/ [more images or folders]

prints `file,raw_score,score,decision` per image, as the scores CSV of `main.py --score`: the raw score is the
mean of the image's view scores, `score` the same on 0..1 with the threshold at 0.5. Everything it needs comes
from the JSON written beside the .onnx by `python main.py --export` (views: size, angles, mean, std).
"""
import csv
import hashlib
import json
import math
import os
import sys

import numpy as np
import onnxruntime
from PIL import Image


def load_export(onnx_path):
    """(onnxruntime session, the export's JSON), after checking that the JSON belongs to this model file."""
    with open(os.path.splitext(onnx_path)[0] + '.json') as handle:
        description = json.load(handle)
    digest = hashlib.sha256()
    with open(onnx_path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    if digest.hexdigest() != description['model_sha256']:
        sys.exit(f'{onnx_path} is not the model its .json describes (sha256 differs); keep one export together')
    if any(description['views']['colour_jitter']):
        # jittered views are drawn from PyTorch's random stream: only the repository's Scorer makes them
        sys.exit('this model was trained with colour jitter on its test views; score it with deployment.scoring')
    session = onnxruntime.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
    return session, description


def to_rgb(image):
    """An RGB image as the training code makes it: 16-bit grayscale scaled to 8 bits, alpha dropped."""
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N') or (image.mode == 'I' and image.getextrema()[1] > 255):
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), 'L')
    elif image.mode in ('I', 'F'):
        image = Image.fromarray(np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8), 'L')
    return image.convert('RGB')


def image_views(path, description):
    """The views (n, 3, size, size) float32 of one image file, as the JSON's views.how says."""
    size = description['input']['shape'][2]
    views = description['views']
    mean = np.asarray(views['norm_mean'], dtype=np.float32)
    std = np.asarray(views['norm_std'], dtype=np.float32)
    with Image.open(path) as image:
        resized = to_rgb(image).resize((size, size), Image.BILINEAR)
    made = []
    for angle in views['angles_degrees']:
        pixels = np.asarray(resized.rotate(angle, Image.NEAREST, fillcolor=(0, 0, 0)), dtype=np.float32)
        made.append(((pixels / np.float32(255) - mean) / std).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(made))


def score_image(session, description, path):
    """(raw score, score on 0..1, anomalous) of one image file."""
    view_scores = session.run([description['output']['name']],
                              {description['input']['name']: image_views(path, description)})[0]
    raw = float(np.mean(view_scores, dtype=np.float64))
    scale = description['normalized_score']
    # the logistic curve in log(raw) that the formula is, safe for raw scores up to 1e12 and beyond
    logit = scale['exponent'] * (math.log(max(raw, 1e-300)) - math.log(scale['threshold']))
    score = 1.0 / (1.0 + math.exp(-min(max(logit, -700.0), 700.0)))
    return raw, score, raw > description['threshold']


def image_files(paths):
    """Image files of `paths` (files, or folders searched recursively), in sorted order."""
    extensions = {extension for extension, name in Image.registered_extensions().items() if name in Image.OPEN}
    found = []
    for path in paths:
        if os.path.isdir(path):
            for folder, subfolders, names in os.walk(path):
                subfolders[:] = sorted(name for name in subfolders if not name.startswith('.'))
                found += [os.path.join(folder, name) for name in sorted(names)
                          if os.path.splitext(name)[1].lower() in extensions]
        else:
            found.append(path)
    return found


def main(argv):
    if len(argv) < 2:
        sys.exit('usage: python onnx_scoring_example.py MODEL.onnx IMAGE_OR_FOLDER...')
    session, description = load_export(argv[0])
    table = csv.writer(sys.stdout, lineterminator='\n')
    table.writerow(['file', 'raw_score', 'score', 'decision'])
    for path in image_files(argv[1:]):
        raw, score, anomalous = score_image(session, description, path)
        table.writerow([path, f'{raw:.9g}', f'{score:.6f}', 'anomalous' if anomalous else 'good'])


if __name__ == '__main__':
    main(sys.argv[1:])
