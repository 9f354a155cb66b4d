"""Files written whole: a reader, a resumed run or another process never sees half a file.

Every results file, checkpoint, resume state and cache entry goes through `replace_atomically`.
"""
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile

import numpy as np


def json_safe(value):
    """Replaces NaN and infinities (an undefined AUROC) by None, which JSON can hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (np.floating, np.integer)):
        return json_safe(value.item())
    return value


class WriteFailed(OSError):
    """A file could not be written (a full disk, another I/O error); the file as it was before is untouched
    and no temporary file is left. str() is one line naming the file, the cause and the free space."""


def free_bytes(path):
    """Free bytes on the file system that holds `path` (or its nearest existing parent folder)."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def size_text(n_bytes):
    for unit, scale in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
        if n_bytes >= scale:
            return f'{n_bytes / scale:.3g} {unit}'
    return f'{n_bytes} B'


def replace_atomically(path, write):
    """Calls write(temporary path), syncs it to disk, then renames it to `path`: a reader (or a resumed
    run) never sees half a file, even after a power cut, and the temporary file does not survive a
    failure or an interruption. Each call gets its own temporary file beside `path`, so processes
    writing the same file at once (ranks of a sweep, two runs sharing the feature cache) never touch
    each other's; the last rename wins and every reader sees one whole file."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, part = tempfile.mkstemp(dir=folder, prefix=temporary_prefix(path) + f'{socket.gethostname()}-{os.getpid()}.',
                                    suffix='.part')
    os.close(handle)
    try:
        os.chmod(part, 0o666 & ~current_umask())  # mkstemp's 0600 would make results private to one user
        write(part)
        sync_file(part)
        os.replace(part, path)
    except BaseException as error:
        if os.path.exists(part):
            os.remove(part)
        # torch.save reports a full disk as a RuntimeError from its zip writer
        if isinstance(error, (OSError, RuntimeError)) and not isinstance(error, WriteFailed):
            raise WriteFailed(f'cannot write {path} ({type(error).__name__}: {str(error).strip()[:120]}); '
                              f'{size_text(free_bytes(folder))} free in {folder}') from error
        raise
    sync_file(folder)  # the rename itself reaches the disk
    remove_stale_temporaries(path)


def temporary_prefix(path):
    return f'.{os.path.basename(path)}.'


def remove_stale_temporaries(path):
    """Removes the temporary files of `path` that writers on this machine left when they were killed
    (SIGKILL, power cut: no handler runs); those of live processes, and of other machines sharing the
    folder, are left alone. Names: .<file>.<host>-<pid>.<random>.part"""
    folder, prefix, host = os.path.dirname(os.path.abspath(path)), temporary_prefix(path), socket.gethostname()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith('.part')):
            continue
        writer = name[len(prefix):-len('.part')].rsplit('.', 1)[0]
        writer_host, _, pid = writer.rpartition('-')
        if writer_host != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        try:
            os.remove(os.path.join(folder, name))
        except OSError:
            pass  # another process removed it first


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def sync_file(path):
    """fsync of a file or folder; some file systems cannot sync folders, which only costs durability."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path):
    """sha256 of a file's bytes, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path, data):
    text = json.dumps(json_safe(data), indent=2, allow_nan=False)  # fails before touching the old file
    write_text_atomic(path, text)


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


def write_text_atomic(path, text):
    def write(part):
        with open(part, 'w', newline='', encoding='utf-8') as handle:
            handle.write(text)
    replace_atomically(path, write)
