"""How the files a run writes are named: a job's files, and its gradient maps' PNGs (written by localization.py,
shown by report.html, written by --score --maps)."""
import os


def file_stem(class_name, seed, seeds):
    """How a job's files are named: '<class>', or '<class>_seed<seed>' in a run of several seeds."""
    return f'{class_name}_seed{seed}' if len(seeds) > 1 else class_name


def map_png_name(defect_type, image_path):
    """The PNG name of an anomalous test image's gradient map in maps/<stem>/ (report.html shows them)."""
    return f'{defect_type}_{os.path.splitext(os.path.basename(image_path))[0]}.png'


def map_file_name(image_path, common_root):
    """A flat PNG name for an image: its path below `common_root` with separators as '__'."""
    relative = os.path.relpath(os.path.abspath(image_path), common_root)
    return os.path.splitext(relative)[0].replace(os.sep, '__') + '_map.png'
