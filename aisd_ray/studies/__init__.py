"""Many runs, above the stages' door: a Ray Tune search, patient k-fold cross-validation with its
ensemble, the demo over seeds, and the accuracy variants side by side."""
