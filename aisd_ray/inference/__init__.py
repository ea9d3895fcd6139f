"""An export and its use: the SavedModel (TTA, fold ensembles), the input-kind check,
post-processing, and infer on image folders and on CT patients."""
