"""The images of a class in the dataset folder: its layout, its training and test samples, a scan of every file
before training, the validation split and the few-shot subset.

Three layouts are read where they lie, detected per class (`detect_layout`):

The official DifferNet layout, one folder per class under `dataset_path`:

    <dataset_path>/<class>/
    ├── train/good/              defect-free training images
    └── test/
        ├── good/                defect-free test images            -> label 0
        └── <defect type>/       any other folder name              -> label 1

MVTec AD as distributed: the same, plus pixel masks of the defective test images:

    <dataset_path>/<class>/
    ├── train/good/
    ├── test/{good, <defect type>, ...}/
    └── ground_truth/<defect type>/<name>_mask.png

Magnetic Tile Defects (MTD) as distributed, one class named `mtd` (`--dataset_path <the MTD folder>
--class_name mtd`); DifferNet's own split, shipped in splits/mtd_train_filenames.txt, names the 761
defect-free training images; the other defect-free ones and every defective one are the test set:

    <dataset_path>/
    ├── MT_Free/Imgs/<name>.jpg      defect-free (grayscale JPEG, sizes vary), <name>.png beside each
    └── MT_<Defect>/Imgs/<name>.jpg  Blowhole, Break, Crack, Fray, Uneven  -> label 1, type <defect>,
                                     mask <name>.png beside it

BTAD (BeanTech Anomaly Detection) as distributed (.bmp images in class 01, .png elsewhere):

    <dataset_path>/{01,02,03}/
    ├── train/ok/                defect-free training images
    ├── test/ok/                 defect-free test images            -> label 0
    ├── test/ko/                 anomalous test images              -> label 1
    └── ground_truth/ko/<name>.png

Any image format Pillow reads is accepted (png, jpg, bmp, tif, ...); hidden files are ignored.
"""
import difflib
import os

import numpy as np

from base.errors import DataProblems, UserError
from image_data.image_files import Sample, image_problems, list_images
from image_data.mtd import MTD_CLASS, find_mtd_samples, is_mtd_folder

SUBSET_SEED_OFFSET = 3_000  # the few-shot subset's numpy seed, apart from the validation split's
EXPECTED_TREE = ('<dataset_path>/<class>/train/good/*.png and <class>/test/{good,<defect type>}/*.png '
                 '(or BTAD: <class>/train/ok, <class>/test/{ok,ko})')
NORMAL_FOLDERS = {'official': 'good', 'mvtec': 'good', 'btad': 'ok'}


def class_folders(dataset_path):
    """The classes of `dataset_path`: its sub-folders, or ['mtd'] for the MTD folder itself."""
    if is_mtd_folder(dataset_path):
        return [MTD_CLASS]
    return sorted(name for name in os.listdir(dataset_path)
                  if os.path.isdir(os.path.join(dataset_path, name)) and not name.startswith('.'))


def class_folder_of(dataset_path, class_name):
    """The folder of a class: <dataset_path>/<class>, or the MTD folder itself for class 'mtd'."""
    if class_name == MTD_CLASS and is_mtd_folder(dataset_path):
        return dataset_path
    return os.path.join(dataset_path, class_name)


def detect_layout(class_root):
    """'mtd' (MT_Free/Imgs), 'btad' (train/ok), 'mvtec' (good folders plus ground_truth/) or 'official'
    (good folders only)."""
    if is_mtd_folder(class_root):
        return 'mtd'
    if os.path.isdir(os.path.join(class_root, 'train', 'ok')):
        return 'btad'
    if os.path.isdir(os.path.join(class_root, 'ground_truth')):
        return 'mvtec'
    return 'official'


def find_mask(class_root, defect_type, image_path):
    """ground_truth/<defect type>/<name>_mask.<ext> (MVTec AD) or <name>.<ext> (BTAD), else None."""
    folder = os.path.join(class_root, 'ground_truth', defect_type)
    if not os.path.isdir(folder):
        return None
    stem = os.path.splitext(os.path.basename(image_path))[0]
    for candidate in list_images(folder):
        if os.path.splitext(os.path.basename(candidate))[0] in (f'{stem}_mask', stem):
            return candidate
    return None


def find_class_samples(dataset_path, class_name):
    """Returns (train_samples, test_samples), lists of Sample, in any of the three layouts.

    Raises UserError naming the missing or empty folder and the expected tree.
    """
    if not os.path.isdir(dataset_path):
        raise UserError(f'dataset path {dataset_path} does not exist; expected {EXPECTED_TREE}')
    if class_name == MTD_CLASS and is_mtd_folder(dataset_path):
        return find_mtd_samples(dataset_path)
    class_root = os.path.join(dataset_path, class_name)
    if not os.path.isdir(class_root):
        known = class_folders(dataset_path)
        close = difflib.get_close_matches(class_name, known, n=3, cutoff=0.4)
        hint = f'did you mean {", ".join(close)}?' if close else f'classes found: {", ".join(known) or "none"}'
        raise UserError(f"class '{class_name}' not found in {dataset_path} ({hint}); expected {EXPECTED_TREE}")
    normal = NORMAL_FOLDERS[detect_layout(class_root)]
    train_normal = os.path.join(class_root, 'train', normal)
    test_root = os.path.join(class_root, 'test')
    for folder in (train_normal, os.path.join(test_root, normal)):
        if not os.path.isdir(folder):
            raise UserError(f'missing folder {folder}; expected {EXPECTED_TREE}')
        if not list_images(folder):
            raise UserError(f'no images in {folder}; expected {EXPECTED_TREE}')
    train = [Sample(path, 0, normal) for path in list_images(train_normal)]
    test = []
    for defect_type in class_folders(test_root):
        label = 0 if defect_type == normal else 1
        test += [Sample(path, label, defect_type, find_mask(class_root, defect_type, path) if label else None)
                 for path in list_images(os.path.join(test_root, defect_type))]
    return train, test


def scan_class(dataset_path, class_name, train_samples, test_samples):
    """Opens and decodes every file of a class once, before any training.

    Returns the warnings (list of str). Raises DataProblems listing, with paths, every file that is not a
    readable image: zero-byte, truncated or corrupt files, non-image files in the image folders. Modes
    other than RGB (grayscale, RGBA, palette, 16-bit) are fine: `load_rgb` converts them.
    """
    root = class_folder_of(dataset_path, class_name)
    problems, sizes = [], {}
    folders = sorted({os.path.dirname(sample.path) for sample in train_samples + test_samples})
    for folder in folders:
        images = set(list_images(folder))
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.startswith('.') or not os.path.isfile(path) or path in images:
                continue
            problems.append((path, f'not an image file ({os.path.splitext(name)[1] or "no extension"}); '
                                   f'move it out of {folder}'))
    problems += image_problems([sample.path for sample in train_samples + test_samples], sizes)
    if problems:
        raise DataProblems(class_name, problems)
    warnings = []
    areas = np.array([width * height for width, height in sizes.values()], dtype=np.float64)
    if len(areas) and areas.max() > 16 * areas.min():
        smallest = min(sizes, key=lambda path: sizes[path][0] * sizes[path][1])
        largest = max(sizes, key=lambda path: sizes[path][0] * sizes[path][1])
        warnings.append(f'image sizes differ widely in {root}: {smallest} is {sizes[smallest]}, '
                        f'{largest} is {sizes[largest]}; all are resized to the same square input')
    if not any(sample.label for sample in test_samples):
        warnings.append(f'{root} has no anomalous test images: AUROC is not defined, only the test loss '
                        'is reported')
    return warnings


def n_validation_images(fraction, n_samples):
    """How many of `n_samples` training images `val_fraction` = `fraction` holds out (at least 1 when > 0)."""
    return max(1, int(round(fraction * n_samples))) if fraction > 0 else 0


def split_validation(samples, fraction, seed):
    """(training, validation) samples: round(fraction * n) of them (at least 1 when fraction > 0) held
    out, picked with numpy seed `seed` from the samples in sorted order; both parts stay sorted. The
    same files, fraction and seed always give the same split."""
    samples = sorted(samples)
    if fraction <= 0:
        return samples, []
    n_validation = n_validation_images(fraction, len(samples))
    if n_validation >= len(samples):
        raise UserError(f'val_fraction = {fraction} holds out {n_validation} of the {len(samples)} training '
                        f'images, leaving none to train on; lower val_fraction')
    picked = set(np.random.RandomState(seed).choice(len(samples), n_validation, replace=False).tolist())
    return ([s for i, s in enumerate(samples) if i not in picked],
            [s for i, s in enumerate(samples) if i in picked])


def training_subset(samples, n_images, seed):
    """The `n_images` training images of a few-shot run (n_train_images; 0 = all of `samples`): the first
    n_images of a permutation drawn with numpy seed seed + SUBSET_SEED_OFFSET from the samples in sorted
    order, kept sorted. The same files, K and seed give the same images on any machine, and the images of a
    smaller K are among those of a larger one (a prefix of the same permutation)."""
    samples = sorted(samples)
    if n_images <= 0:
        return samples
    if n_images > len(samples):
        raise UserError(f'n_train_images = {n_images} asks for more than the {len(samples)} training images '
                        f'there are; lower it, or 0 for all')
    order = np.random.RandomState(seed + SUBSET_SEED_OFFSET).permutation(len(samples))
    return sorted(samples[i] for i in order[:n_images])
