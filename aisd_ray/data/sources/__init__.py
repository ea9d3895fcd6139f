"""Every reader of what users have (the original's PNG tree, the raw AISD release, its DICOM
archive, DICOM series and enhanced CT, NIfTI, nnU-Net datasets) and the writer of masks back into
the input's own geometry."""
