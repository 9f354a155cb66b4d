"""Running jobs: one (class, seed) job, a run's jobs one after another, torchrun sweeps, the disk they need."""
