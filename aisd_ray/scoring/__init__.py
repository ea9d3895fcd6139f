"""The figures: scores from counts, lesion metrics on slices, and spacing-aware volume metrics
(HD95, NSD, mL, lesion-wise detection). Below training, which scores every epoch with them."""
