"""The state --resume continues from: the flow, Adam, the history and every random stream, written whole."""
import random

import numpy as np
import torch

from base.atomic_files import replace_atomically
from base.errors import UserError


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


def save_resume_state(path, meta_epoch, model, optimizer, history, scores, best_scores, elapsed):
    """Everything needed to continue after `meta_epoch` exactly as if never stopped; written whole."""
    state = {'meta_epoch': meta_epoch, 'flow': model.nf.state_dict(), 'optimizer': optimizer.state_dict(),
             'history': history, 'scores': [float(s) for s in scores], 'best_scores': [float(s) for s in best_scores],
             'elapsed_s': elapsed, 'rng': rng_state()}
    replace_atomically(path, lambda part: torch.save(state, part))


def load_resume_state(path, model, optimizer):
    """Loads the state at `path` into the flow of `model` and `optimizer`, restores every random stream, and
    returns the state (meta_epoch, history, scores, best_scores, elapsed_s)."""
    try:
        # on the CPU: random-generator states must be CPU tensors; load_state_dict moves the rest
        state = torch.load(path, map_location='cpu', weights_only=True)
        model.nf.load_state_dict(state['flow'])
        optimizer.load_state_dict(state['optimizer'])
        set_rng_state(state['rng'])
    except Exception as error:  # truncated (a machine that lost power), altered, or of another run
        raise UserError(f'resume state {path} is damaged or belongs to another run ({type(error).__name__}: '
                        f'{str(error).strip()[:100]}); delete it to train this class from its start, or put the '
                        f'whole file back') from None
    return state
