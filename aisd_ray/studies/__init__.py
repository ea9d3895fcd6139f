"""Many runs, above the stages' door: a Ray Tune search, patient k-fold cross-validation with its
ensemble (and the whole study: ``pipeline --folds K``), the demo over seeds, and the accuracy variants side by side."""
