"""Processes writing the same file at once (ranks of a sweep, two runs sharing the feature cache) each
succeed, and what is left is one whole, valid file."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import torch

from base.atomic_files import write_json_atomic
from conftest import REPO_ROOT
from base.feature_cache import load_cached_features

WRITER = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, {repo!r})
    import torch
    from base.atomic_files import write_json_atomic
    from base.feature_cache import save_cached_features
    folder, writer, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    while time.time() < start:  # both writers begin together
        time.sleep(0.001)
    for i in range(60):
        features = torch.full((20, 4, 64), float(writer * 1000 + i))
        save_cached_features(os.path.join(folder, 'cache'), 'samekey', features, [writer] * 20)
        write_json_atomic(os.path.join(folder, 'results.json'),
                          {{'writer': writer, 'i': i, 'payload': list(range(5000))}})
''').format(repo=REPO_ROOT)


def test_two_processes_write_the_same_cache_key_and_results_file(tmp_path):
    start = time.time() + 3
    writers = [subprocess.Popen([sys.executable, '-c', WRITER, str(tmp_path), str(writer), str(start)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for writer in (1, 2)]
    for process in writers:
        _, error = process.communicate(timeout=240)
        assert process.returncode == 0, error
    with open(tmp_path / 'results.json') as handle:
        results = json.load(handle)
    assert results['writer'] in (1, 2) and results['i'] == 59 and len(results['payload']) == 5000
    features, labels = load_cached_features(str(tmp_path / 'cache'), 'samekey')
    writer = int(labels[0])
    assert writer in (1, 2) and (labels == writer).all()
    assert torch.equal(features, torch.full((20, 4, 64), float(writer * 1000 + 59)))  # one writer's whole file
    leftovers = [name for folder in (tmp_path, tmp_path / 'cache') for name in os.listdir(folder)
                 if name.endswith('.part')]
    assert leftovers == []


def test_atomic_files_keep_ordinary_permissions(tmp_path):
    path = tmp_path / 'results.json'
    write_json_atomic(str(path), {'a': 1})
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


def test_temporary_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    """A writer killed mid-write (SIGKILL: no handler runs) leaves its temporary file; the next write of the
    same file removes it, but never a live process's."""
    target = tmp_path / 'state.pt'
    killed = subprocess.Popen([sys.executable, '-c', 'pass'])
    killed.wait()  # its pid no longer runs
    host = socket.gethostname()
    stale = tmp_path / f'.state.pt.{host}-{killed.pid}.abc123.part'
    live = tmp_path / f'.state.pt.{host}-{os.getpid()}.def456.part'
    elsewhere = tmp_path / f'.state.pt.other-host-{killed.pid}.ghi789.part'
    for path in (stale, live, elsewhere):
        path.write_text('half a file')
    write_json_atomic(str(target), {'a': 1})
    assert not stale.exists() and live.exists() and elsewhere.exists()
    assert json.loads(target.read_text()) == {'a': 1}
