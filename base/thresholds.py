"""From raw scores to decisions: the score statistics a checkpoint keeps of defect-free images, the threshold at
a false-positive rate, and the 0..1 scale of raw scores with the threshold at 0.5."""
import math

import numpy as np

from base.errors import UserError

SCORE_QUANTILES = (0.5, 0.9, 0.95, 0.99, 1.0)


def score_statistics(scores, files):
    """What a checkpoint keeps of the scores of defect-free images: n, mean, std, quantiles, and the raw
    scores with their files (a threshold for any false-positive rate can be set from them later)."""
    scores = np.asarray(scores, dtype=np.float64)
    return {'n': int(len(scores)), 'mean': float(scores.mean()), 'std': float(scores.std()),
            'quantiles': {str(q): float(np.quantile(scores, q)) for q in SCORE_QUANTILES},
            'scores': [float(s) for s in scores], 'files': list(files)}


def threshold_at_fpr(scores, fpr):
    """The smallest of `scores` that at most floor(fpr * n) of them exceed: with `score > threshold`
    as the decision, the share of these images called anomalous is at most `fpr`."""
    ranked = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    allowed = int(math.floor(fpr * len(ranked) + 1e-9))
    return float(ranked[min(allowed, len(ranked) - 1)])


def decision_threshold(reference_scores, fpr, explicit=None, checkpoint_path=''):
    """(threshold, one line saying where it comes from)."""
    if explicit is not None:
        return float(explicit), 'given with --threshold'
    for name, what in (('validation', 'held-out defect-free validation images'),
                       ('training', "training images' own scores (optimistic: the flow was fitted to them; "
                                    'train with --val_fraction 0.1 for a held-out threshold)')):
        stats = (reference_scores or {}).get(name)
        if stats:
            threshold = threshold_at_fpr(stats['scores'], fpr)
            return threshold, f"score at false-positive rate {fpr:g} on the {stats['n']} {what}"
    raise UserError(f'checkpoint {checkpoint_path} holds no scores of defect-free images (an official '
                    f'checkpoint); give a threshold with --threshold X')


def score_normalization(reference_scores, threshold):
    """{'threshold', 'exponent'} of the 0..1 scale: score = 1 / (1 + (threshold / raw) ** exponent), i.e. a
    logistic curve in log(raw) centred on the threshold (raw scores span orders of magnitude: about 1 for
    defect-free images, up to 1e12 for defective ones). The exponent puts the median defect-free reference
    score (held-out images, else training ones) at 0.25: exponent = ln 3 / ln(threshold / median); 1 where
    there is no such median below the threshold (an official checkpoint and --threshold)."""
    stats = (reference_scores or {}).get('validation') or (reference_scores or {}).get('training')
    median = stats['quantiles']['0.5'] if stats else None
    exponent = math.log(3) / math.log(threshold / median) if median and 0 < median < threshold else 1.0
    return {'threshold': float(threshold), 'exponent': float(exponent)}


def normalized_scores(raw_scores, normalization):
    """Raw scores (> 0) on the 0..1 scale of `score_normalization`: monotone, the threshold at 0.5."""
    logit = normalization['exponent'] * (np.log(np.maximum(np.asarray(raw_scores, dtype=np.float64), 1e-300))
                                         - math.log(normalization['threshold']))
    return 1.0 / (1.0 + np.exp(-np.clip(logit, -700, 700)))
