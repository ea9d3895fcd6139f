"""What every stage stands on and none owns: storage (pyarrow filesystems, atomic writes, staged
folders), quiet (TensorFlow without its C++ start-up chatter), progress bars, provenance."""
