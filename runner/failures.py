"""What a job that fails keeps and says: its cause in one line ending with the command that continues it, and
its resume state, kept until the job's checkpoint and results are on disk.

Nothing a job computed is lost when it fails: every meta epoch's state stays in <results_dir>/resume/, and
`python main.py --resume DIR` continues there (after the last meta epoch: straight to the checkpoint, the
maps and the results).
"""
import logging
import os
import shlex

from base.atomic_files import WriteFailed, remove_stale_temporaries
from base.errors import RunStopped, UserError

logger = logging.getLogger(__name__)

RESUME_DIR = 'resume'
OUT_OF_MEMORY_HINT = ('out of memory on {device} in class {class_name}: lower batch_size ({batch_size}), '
                      'extract_batch_size ({extract_batch_size}), n_transforms_test ({n_transforms_test}) '
                      'or train_feature_pool ({train_feature_pool}), or use --device cpu')


def continue_command(results_dir):
    return f'python main.py --resume {shlex.quote(str(results_dir))}'


def resume_state_path(results_dir, class_name, seed):
    return os.path.join(results_dir, RESUME_DIR, f'{class_name}_seed{seed}.pt')


def is_out_of_memory(error):
    return isinstance(error, MemoryError) or 'out of memory' in str(error).lower() or \
        "can't allocate memory" in str(error).lower()


def failure_message(error, config, device, class_name, seed, catch_all):
    """The cause of a job's failure in words, for an exception that fails the job: the user's data or
    settings (UserError), a full disk (WriteFailed), out of memory, or with `catch_all` any other (a sweep
    goes on with its other jobs). None: a bug that stops the run."""
    if isinstance(error, (UserError, WriteFailed)):
        return str(error)
    if isinstance(error, (RuntimeError, MemoryError)) and is_out_of_memory(error):
        return OUT_OF_MEMORY_HINT.format(**{**vars(config), 'device': device, 'class_name': class_name})
    if catch_all:
        logger.exception(f'class {class_name} (seed {seed}) failed:')
        return f'{type(error).__name__}: {error}'
    return None


def failure_line(class_name, seed, message, results_dir, state_path):
    """The line a failed job ends with: the cause, what is kept, and the command that continues it."""
    if state_path and os.path.isfile(state_path):
        kept = 'the meta epochs it finished are kept'
    else:
        kept = 'it starts again from its first meta epoch'
    return f'error: class {class_name} (seed {seed}) failed: {message}; {kept}: continue with: ' \
           f'{continue_command(results_dir)}'


def finished_whole(entry):
    """Whether a job's entry is final: trained to the end and its checkpoint, if asked for, written."""
    return entry is not None and entry.get('status') == 'done' and not entry.get('checkpoint_error')


def remove_resume_state(state_path):
    """Removes a finished job's resume state, and the temporary file of a writer killed while saving it."""
    if os.path.isfile(state_path):
        os.remove(state_path)
    remove_stale_temporaries(state_path)


def remove_finished_states(results_dir, finished):
    """Removes the resume states of the jobs in `finished` ((class, seed) pairs recorded as done on disk) that
    a stop between their last write and the state's removal left, and resume/ when it is empty then."""
    for class_name, seed in finished:
        remove_resume_state(resume_state_path(results_dir, class_name, seed))
    folder = os.path.join(results_dir, RESUME_DIR)
    if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)


def failed_jobs_text(results_dir, failed):
    """The end of a run's summary for its failed jobs: each one, and the one command that continues them."""
    command = continue_command(results_dir)
    lines = [f'{len(failed)} job(s) failed; finished jobs are kept, and what the failed ones computed too. After '
             'fixing the cause:']
    for failure in failed:
        seed = f" (seed {failure['seed']})" if failure.get('seed') is not None else ''
        lines.append(f"  {failure['class_name']}{seed}: continue with: {command}")
    return '\n'.join(lines)


def stopped_by_bug(error, results_dir):
    """Logs an unexpected error's traceback and the line saying how to continue; returns the RunStopped
    that main.py turns into exit status 1."""
    logger.error('the run stopped on an unexpected error (a bug: please report it with this traceback):',
                 exc_info=error)
    line = (f'error: {type(error).__name__}: {" ".join(str(error).split())[:200]}; nothing computed is lost: '
            f'continue with: {continue_command(results_dir)}')
    logger.error(line)
    return RunStopped(line)
