"""What a run writes to disk: the size of its checkpoints and resume states, said before it starts."""
import torch
import torchvision

from model import build_flow

BYTES_PER_VALUE = 4  # float32 parameters and Adam moments


def flow_parameter_count(config):
    """Parameters of the flow that `config` builds, counted on the meta device (nothing is allocated)."""
    with torch.device('meta'):
        flow = build_flow(config)
    return sum(parameter.numel() for parameter in flow.parameters())


def alexnet_parameter_count():
    with torch.device('meta'):
        features = torchvision.models.alexnet(weights=None).features
    return sum(parameter.numel() for parameter in features.parameters())


def checkpoint_bytes(config):
    """Size of one <class>_checkpoint.pt: the flow, plus the AlexNet weights when they cannot be reloaded
    from the ImageNet source (random or a weights_path file; model.save_checkpoint). The history and
    reference scores add kilobytes."""
    values = flow_parameter_count(config)
    if not config.pretrained or config.weights_path:
        values += alexnet_parameter_count()
    return values * BYTES_PER_VALUE


def resume_state_bytes(config):
    """Size of one resume state: the flow and Adam's two moments per parameter (train.save_resume_state)."""
    return 3 * flow_parameter_count(config) * BYTES_PER_VALUE


def size_text(n_bytes):
    for unit, scale in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
        if n_bytes >= scale:
            return f'{n_bytes / scale:.3g} {unit}'
    return f'{n_bytes} B'


def disk_text(config, n_jobs, running_at_once=1):
    """The line a run starts with: what its checkpoints and resume states will take on disk."""
    if config.save_checkpoint or config.save_best:
        files = ' + '.join(name for name, on in (('<class>_checkpoint.pt', config.save_checkpoint),
                                                 ('<class>_best.pt', config.save_best)) if on)
        per_job = checkpoint_bytes(config) * (int(config.save_checkpoint) + int(config.save_best))
        checkpoints = f'{size_text(per_job)} per job for {files} ({n_jobs} job{"s" if n_jobs != 1 else ""}: {size_text(n_jobs * per_job)})'
    else:
        checkpoints = 'no checkpoints (save_checkpoint = False)'
    if config.resume_state:
        per_running_job = resume_state_bytes(config)
        at_once = f', {running_at_once} at once: {size_text(running_at_once * per_running_job)}' \
            if running_at_once > 1 else ''
        states = f'{size_text(per_running_job)} per running job for its resume state (removed when the job ends{at_once})'
    else:
        states = 'no resume states (resume_state = False)'
    return f'disk: {checkpoints}; {states}'
