"""Training: the shared loop (``loop``), its checkpoint format, and the Ray / local backends."""


class TrainingFailed(RuntimeError):
    """Training stopped for good: the divergence guard stopped the run (``train.on_collapse``), or
    Ray Train's workers failed more often than ``train.max_failures`` allows. The message is one
    line: the reason and what to do. The CLI exits 1."""
