"""A run's results folder: a fresh one for a new run, the one --resume names, the jobs finished there
(results.json's entries and the job files a sweep writes, one per job)."""
import datetime
import os
import re
import socket

from base.atomic_files import read_json, write_json_atomic
from base.errors import UserError
from runner.failures import finished_whole

JOBS_DIR = 'jobs'  # a sweep's finished jobs, one file each: jobs/<class>_seed<seed>.json
JOB_FILE_NAME = re.compile(r'[^.].*_seed-?\d+\.json')


def fresh_results_dir(config, class_names):
    """`results_dir` if given (created; refused if an earlier run wrote there), else
    results/<date>_<time>_<classes>; never an existing run's folder."""
    if config.results_dir:
        if os.path.isfile(os.path.join(config.results_dir, 'results.json')):
            raise UserError(f'results_dir {config.results_dir} holds an earlier run; choose another folder, '
                            f'or continue it with --resume {config.results_dir}')
        os.makedirs(config.results_dir, exist_ok=True)
        return config.results_dir
    stamp = datetime.datetime.now().strftime('%Y%m%d_%H%M%S')
    base = os.path.join('results', f"{stamp}_{'_'.join(class_names)[:60]}")
    path, suffix = base, 1
    while os.path.exists(path):
        suffix += 1
        path = f'{base}_{suffix}'
    os.makedirs(path)
    return path


def load_run_to_resume(results_dir):
    """(its saved settings {name: value}, results) of the run in `results_dir`, for --resume."""
    path = os.path.join(results_dir, 'results.json')
    if not os.path.isfile(path):
        raise UserError(f'nothing to resume in {results_dir}: no results.json there; give the folder a run printed')
    results = read_json(path)
    return results['config'], results


# --- finished jobs: results.json's entries and a sweep's job files ------------------------------------

def job_file(results_dir, class_name, seed):
    return os.path.join(results_dir, JOBS_DIR, f'{class_name}_seed{seed}.json')


def write_job_file(results_dir, class_name, seed, entry, failure, rank):
    """Records one finished job: status done, diverged (entry and error) or failed (error only)."""
    status = 'failed' if entry is None else entry['status']
    record = {'class_name': class_name, 'seed': seed, 'status': status,
              'error': failure['error'] if failure else None, 'entry': entry, 'rank': rank,
              'host': socket.gethostname(), 'finished': datetime.datetime.now().isoformat(timespec='seconds')}
    os.makedirs(os.path.join(results_dir, JOBS_DIR), exist_ok=True)
    write_json_atomic(job_file(results_dir, class_name, seed), record)
    return record


def read_job_files(results_dir):
    """{(class, seed): record} of the jobs/ folder (empty when there is none)."""
    folder = os.path.join(results_dir, JOBS_DIR)
    records = {}
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if JOB_FILE_NAME.fullmatch(name):  # not the temporary file of a write in progress
                record = read_json(os.path.join(folder, name))
                records[(record['class_name'], record['seed'])] = record
    return records


def done_entries(results):
    """{(class, seed): entry} of the jobs that results.json's dict `results` holds as finished whole (a job
    whose checkpoint could not be written is not: --resume writes it)."""
    return {(entry['class_name'], entry['seed']): entry for entry in (results or {}).get('classes', [])
            if finished_whole(entry)}


def finished_entries(results_dir, results=None):
    """{(class, seed): entry} of every job finished in `results_dir`: those of its results.json (`results`),
    then those a sweep recorded in its job files."""
    entries = done_entries(results)
    for key, record in read_job_files(results_dir).items():
        if finished_whole(record['entry']):
            entries.setdefault(key, record['entry'])
    return entries


# --- one job --------------------------------------------------------------------------------------
