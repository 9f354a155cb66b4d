"""Magnetic Tile Defects (MTD) as its authors distribute it, read as one class named `mtd` with DifferNet's
own split (splits/mtd_train_filenames.txt, from the official repository):

    <dataset_path>/
    ├── MT_Free/Imgs/<name>.jpg      defect-free (grayscale JPEG, sizes vary), <name>.png beside each
    └── MT_<Defect>/Imgs/<name>.jpg  Blowhole, Break, Crack, Fray, Uneven  -> label 1, type <defect>,
                                     mask <name>.png beside it

train = the 761 listed MT_Free images; test = the other MT_Free images and every defective one (583).
"""
import os

from base.errors import UserError
from image_data.image_files import Sample, list_images

MTD_CLASS = 'mtd'
MTD_TRAIN_LIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'splits',
                              'mtd_train_filenames.txt')


def is_mtd_folder(path):
    return os.path.isdir(os.path.join(path, 'MT_Free', 'Imgs'))


def read_mtd_train_list(path=MTD_TRAIN_LIST):
    """The file names of DifferNet's MTD training images, in the list's order."""
    if not os.path.isfile(path):
        raise UserError(f'the MTD training list {path} is missing; restore splits/mtd_train_filenames.txt from '
                        f'the repository (it is DifferNet\'s own split)')
    with open(path) as handle:
        return [line.strip() for line in handle if line.strip()]


def find_mtd_samples(dataset_path, train_list=MTD_TRAIN_LIST):
    """(train, test) Samples of MTD: train = the listed MT_Free images; test = the other MT_Free images
    (label 0, type 'good', no mask: defect-free) and every MT_<Defect> image (label 1, type <defect>, its
    <name>.png mask). Raises UserError naming a missing folder or listed names not in MT_Free/Imgs."""
    folders = sorted(name for name in os.listdir(dataset_path)
                     if name.startswith('MT_') and os.path.isdir(os.path.join(dataset_path, name)))
    for name in folders:
        if not os.path.isdir(os.path.join(dataset_path, name, 'Imgs')):
            raise UserError(f'missing folder {os.path.join(dataset_path, name, "Imgs")}; MTD as distributed '
                            f'has MT_<type>/Imgs/<name>.jpg with <name>.png beside each')
    if len(folders) < 2:
        raise UserError(f'{dataset_path} has MT_Free/Imgs but no MT_<defect>/Imgs folder: nothing anomalous to test')
    free_folder = os.path.join(dataset_path, 'MT_Free', 'Imgs')
    free = {os.path.basename(path): path for path in mtd_images(free_folder)}
    listed = read_mtd_train_list(train_list)
    unknown = [name for name in listed if name not in free]
    if unknown:
        raise UserError(f'{len(unknown)} of the {len(listed)} names in {train_list} are not in {free_folder} '
                        f'(first: {unknown[0]}); give --dataset_path the MTD folder as distributed')
    chosen = set(listed)
    train = [Sample(free[name], 0, 'good') for name in sorted(chosen)]
    test = [Sample(path, 0, 'good') for name, path in sorted(free.items()) if name not in chosen]
    for folder in folders:
        if folder != 'MT_Free':
            defect_type = folder[len('MT_'):].lower()
            for path in mtd_images(os.path.join(dataset_path, folder, 'Imgs')):
                mask = os.path.splitext(path)[0] + '.png'
                test.append(Sample(path, 1, defect_type, mask if os.path.isfile(mask) else None))
    return train, test


def mtd_images(folder):
    """The .jpg images of an MTD Imgs folder (the .png beside each is its mask)."""
    return [path for path in list_images(folder) if path.lower().endswith(('.jpg', '.jpeg'))]
