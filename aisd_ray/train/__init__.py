"""Training: the shared loop (``loop``), its checkpoint format, and the Ray / local backends."""


class TrainingFailed(RuntimeError):
    """Training stopped for good: Ray Train's workers failed more often than ``train.max_failures``
    allows. The message is one line: the first worker's error and what to do."""
