"""An export scored on a split, and NIfTI prediction folders scored in mm and mL."""
