"""The state --resume continues from: the flow, Adam, the history and every random stream, written whole,
marked with its format and the settings it was computed with, and checked before anything trusts it."""
import random

import numpy as np
import torch

from base.atomic_files import replace_atomically
from base.errors import UserError
from base.settings import same_value

FORMAT = 'differnet resume state'
VERSION = 2  # of what a state holds; a file of another version (or of none) is refused, never guessed at
START_AFRESH = 'delete it to train this class from its start'


def rng_state():
    numpy_state = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'python': random.getstate(),
            'numpy': [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    random.setstate(tuple(tuple(item) if isinstance(item, list) else item for item in state['python']))
    numpy_state = state['numpy']
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_resume_state(path, meta_epoch, model, optimizer, history, scores, best_scores, elapsed, settings,
                      test_labels):
    """Everything needed to continue after `meta_epoch` exactly as if never stopped; written whole.

    `settings` ({name: value}, base.settings.job_number_settings) are those the state was computed with;
    `optimizer` is None after the last meta epoch, where nothing is left to train (a third of the size)."""
    state = {'format': FORMAT, 'version': VERSION, 'settings': settings, 'meta_epoch': meta_epoch,
             'flow': model.nf.state_dict(), 'optimizer': None if optimizer is None else optimizer.state_dict(),
             'history': history, 'scores': [float(s) for s in scores], 'best_scores': [float(s) for s in best_scores],
             'test_labels': [int(label) for label in test_labels], 'elapsed_s': elapsed, 'rng': rng_state()}
    replace_atomically(path, lambda part: torch.save(state, part))


def read_resume_state(path, settings):
    """The state at `path`, refused with a one-line UserError when it is damaged (truncated, altered), of
    another format or version, or was computed with other `settings` than these: it is never trained over."""
    try:
        # on the CPU: random-generator states must be CPU tensors; load_state_dict moves the rest
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # truncated (a machine that lost power), altered, or not a torch file
        raise damaged(path, error) from None
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        raise UserError(f'{path} is not a resume state of this code; {START_AFRESH}')
    if state.get('version') != VERSION:
        raise UserError(f"resume state {path} was written by another version of this code (version "
                        f"{state.get('version')}; this code reads {VERSION}); continue it with that code, or "
                        f'{START_AFRESH}')
    saved = state.get('settings') or {}
    differing = [name for name in settings if name not in saved or not same_value(saved[name], settings[name])]
    if differing:
        name = differing[0]
        raise UserError(f'resume state {path} belongs to another configuration ({name} {saved.get(name)!r} there, '
                        f'{settings[name]!r} here{f", and {len(differing) - 1} more" if len(differing) > 1 else ""}); '
                        f'{START_AFRESH}, or resume the run that wrote it')
    return state


def apply_resume_state(path, state, model, optimizer):
    """Loads a state of read_resume_state into the flow of `model` and `optimizer` (not after the last meta
    epoch: nothing is left to train) and restores every random stream."""
    try:
        model.nf.load_state_dict(state['flow'])
        if state['optimizer'] is not None:
            optimizer.load_state_dict(state['optimizer'])
        set_rng_state(state['rng'])
    except Exception as error:  # whole and of this version, yet not this flow: altered by hand
        raise damaged(path, error) from None


def damaged(path, error):
    return UserError(f'resume state {path} is damaged or belongs to another run ({type(error).__name__}: '
                     f"{' '.join(str(error).split())[:100]}); {START_AFRESH}, or put the whole file back")
