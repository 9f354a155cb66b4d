"""The published numbers ours are compared with, as data with their sources: the paper's Tables 1 and 2 and a
published reproduction's image AUROC per class, and MVTec AD's official split they were measured on.

The reference columns of results.md, results.csv and report.html (summary.py) are a small set on purpose:

    Paper                 Table 1 (MVTec AD) or 2 (MTD) of the paper (printed in %, shown as a fraction like ours)
    Max - paper           our max AUROC (mean over seeds) minus the paper's
    Reproduction last     the published reproduction's last-meta-epoch AUROC (it gives none for BTAD)
    Reproduction max      its max AUROC over the 24 meta epochs
    Max - reproduction    our max minus its max

Differences use our max, not our last AUROC: the paper does not say which meta epoch it reports, and of the
reproduction's two columns its max is the one near the paper (means 0.9409 max and 0.9246 last against the
paper's 0.9469), so max against max is the like-for-like reading. A class with another name gets empty
reference cells, and so does an MVTec class whose image counts are not the official split's (a subset or a
re-split; a note under the table says so). The mean row averages each column over the classes that have a
value in it (a difference over the classes that have both sides) and says how many when that is fewer than the
classes that ran.
"""

import numpy as np

REFERENCE_SOURCES = {
    'paper': ('Rudolph, Wandt, Rosenhahn, "Same Same But DifferNet: Semi-Supervised Defect Detection with '
              'Normalizing Flows", WACV 2021, arXiv 2008.12577: Table 1 (MVTec AD) and Table 2 (Magnetic Tile '
              'Defects, DifferNet\'s own split), image AUROC in %'),
    'reproduction': ('a published reproduction (a public GitHub README) that ran the official code with the '
                     "paper's 24 x 8 epochs on NVIDIA L4 GPUs; last and max AUROC over the 24 meta epochs; "
                     'its BTAD classes were rearranged by hand and reported without a last AUROC'),
}

# class: (paper Table 1 or 2 in %, reproduction last AUROC, reproduction max AUROC); None where the source has none.
# The reproduction's values are those its README reports; the paper's are transcribed from its tables (Table 1's
# printed mean, 94.9, is the one later papers citing DifferNet give; docs/faithfulness.md).
REFERENCE_AUROC = {
    'bottle': (99.0, 0.9881, 0.9921),
    'cable': (95.9, 0.9496, 0.9665),
    'capsule': (86.9, 0.8089, 0.8432),
    'carpet': (92.9, 0.9057, 0.9109),
    'grid': (84.0, 0.7109, 0.7937),
    'hazelnut': (99.3, 0.9939, 0.9979),
    'leather': (97.1, 0.9813, 0.9823),
    'metal_nut': (96.1, 0.9580, 0.9619),
    'pill': (88.8, 0.8669, 0.8792),
    'screw': (96.3, 0.9424, 0.9572),
    'tile': (99.4, 0.9751, 0.9978),
    'toothbrush': (98.6, 0.9722, 0.9833),
    'transistor': (91.1, 0.8983, 0.9142),
    'wood': (99.8, 0.9930, 0.9974),
    'zipper': (95.1, 0.9249, 0.9359),
    'mtd': (97.7, None, None),  # Magnetic Tile Defects: the paper's Table 2; the reproduction has no MTD
    '01': (None, None, 0.9903),  # BTAD: the paper has no BTAD results
    '02': (None, None, 0.8298),
    '03': (None, None, 0.9870),
}

# MVTec AD's official split, class: (training images, test images); totals 3,629 and 1,725, as the dataset's
# paper gives. The references were measured on it; a run with other counts (a subset, a re-split) gets no
# reference cells, and a note says why.
OFFICIAL_SPLIT = {
    'bottle': (209, 83), 'cable': (224, 150), 'capsule': (219, 132), 'carpet': (280, 117), 'grid': (264, 78),
    'hazelnut': (391, 110), 'leather': (245, 124), 'metal_nut': (220, 115), 'pill': (267, 167),
    'screw': (320, 160), 'tile': (230, 117), 'toothbrush': (60, 42), 'transistor': (213, 100),
    'wood': (247, 79), 'zipper': (240, 151),
}
# DifferNet's own split of MTD (splits/mtd_train_filenames.txt): the one its Table 2 was measured on
DIFFERNET_SPLITS = {'mtd': (761, 583)}
PAPER_PRINTED_MEAN = 94.9  # the mean the paper prints under Table 1
MVTEC_CLASSES = ('bottle', 'cable', 'capsule', 'carpet', 'grid', 'hazelnut', 'leather', 'metal_nut', 'pill', 'screw',
                 'tile', 'toothbrush', 'transistor', 'wood', 'zipper')
BENCHMARKS = {**{name: 'MVTec AD' for name in MVTEC_CLASSES}, 'mtd': 'MTD', '01': 'BTAD', '02': 'BTAD', '03': 'BTAD'}
PAPER_COMPUTED_MEAN = float(np.mean([REFERENCE_AUROC[name][0] for name in MVTEC_CLASSES]))
PAPER_NOTE = (f'The paper prints the mean of Table 1 as {PAPER_PRINTED_MEAN} %, but its fifteen class values '
              f'average {PAPER_COMPUTED_MEAN:.1f} % ({PAPER_COMPUTED_MEAN:.2f}); the mean rows here are computed, '
              f'so over all fifteen MVTec AD classes the paper column reads {PAPER_COMPUTED_MEAN / 100:.4f}.')


def as_float(value):
    return float('nan') if value is None else float(value)


def runs_by_class(runs):
    by_class = {}
    for run in runs:
        by_class.setdefault(run['class_name'], []).append(run)
    return by_class


def reference_auroc(class_name):
    """The references of a class name as fractions: {'paper', 'reproduction_last', 'reproduction_max'},
    nan where the source has no value (BTAD in the paper, BTAD's last AUROC, any other name)."""
    paper, last, best = REFERENCE_AUROC.get(class_name, (None, None, None))
    return {'paper': as_float(paper) / 100, 'reproduction_last': as_float(last), 'reproduction_max': as_float(best)}


def split_mismatch(class_name, class_runs):
    """Why the runs of `class_name` are not compared with the references, or '': their training (validation
    images included, before a few-shot subset) and test image counts differ from the split the references
    were measured on (OFFICIAL_SPLIT, DIFFERNET_SPLITS). Runs that record no counts are compared."""
    official = OFFICIAL_SPLIT.get(class_name) or DIFFERNET_SPLITS.get(class_name)
    if official is None:
        return ''
    for run in class_runs:
        if 'n_train_images' not in run or 'n_test_images' not in run:
            continue
        counts = (run.get('train_subset_of', run['n_train_images']) + run.get('n_validation_images', 0),
                  run['n_test_images'])
        if counts != official:
            which = "MVTec AD's official split" if class_name in OFFICIAL_SPLIT else "the paper's split"
            return (f'{class_name}: {counts[0]} training and {counts[1]} test images, not {which} '
                    f'({official[0]} and {official[1]}): not compared with the paper or the reproduction, whose '
                    'numbers are for that split')
    return ''


def class_references(class_name, class_runs):
    """reference_auroc of the class, or all nan when its runs used another split (split_mismatch)."""
    if split_mismatch(class_name, class_runs):
        return {key: float('nan') for key in reference_auroc(class_name)}
    return reference_auroc(class_name)


def split_notes(runs):
    """The notes under the tables: classes on another split, and few-shot runs (n_train_images)."""
    notes = [note for name, class_runs in runs_by_class(runs).items() if (note := split_mismatch(name, class_runs))]
    for name, class_runs in runs_by_class(runs).items():
        subsets = sorted({(run['n_train_images'], run['train_subset_of']) for run in class_runs if 'train_subset_of' in run})
        if subsets:
            trained = ', '.join(f'{n} of {of}' for n, of in subsets)
            notes.append(f'{name}: trained on a seeded subset of its training images ({trained}; n_train_images); '
                         'the references are for all of them')
    return notes


def benchmark_of(class_name):
    return BENCHMARKS.get(class_name)


def mean_row_groups(class_names):
    """[(label, class names)] of the mean rows of a table: 'mean' over every class when they come from one
    benchmark (classes of no known benchmark join it); when they span several, one 'mean <benchmark>' row per
    benchmark with two or more classes, so that MVTec AD, BTAD and MTD are never averaged together."""
    benchmarks = {}
    for name in class_names:
        if benchmark_of(name):
            benchmarks.setdefault(benchmark_of(name), []).append(name)
    if len(benchmarks) <= 1:
        return [('mean', list(class_names))] if len(class_names) > 1 else []
    return [(f'mean {benchmark}', names) for benchmark, names in benchmarks.items() if len(names) > 1]


def has_references(runs):
    return any(name in REFERENCE_AUROC and not split_mismatch(name, class_runs)
               for name, class_runs in runs_by_class(runs).items())


def reference_notes():
    return [f"Paper: {REFERENCE_SOURCES['paper']}. {PAPER_NOTE}",
            f"Reproduction: {REFERENCE_SOURCES['reproduction']}.",
            'Differences are our max AUROC (mean over seeds) minus the reference; empty cells: the source has no '
            'value for that class.']
