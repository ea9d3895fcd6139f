"""Training: the shared loop (``loop``), its checkpoint format, and the Ray / local backends."""
