"""Hounsfield-unit facts shared by the readers, the head model and the input channels (one home).

- ``TISSUE_HU`` (-500 HU): halfway between air (about -1000 HU) and fat (about -100 HU): any tissue of
  the head lies above it, air (outside, in the sinuses, the table's padding) below. The readers'
  "is this HU at all" check wants something below it (air); the head model and the symmetry
  channel's midline take what lies above it as the head.
- ``AIR_HU`` (-1024 HU): the value that stands for air where a volume has none to give: NaN or
  infinite voxels outside a NIfTI's field of view, and what a mirror image brings in from outside
  the image. -1024 is the lowest value of 12-bit CT stored with RescaleIntercept -1024.
"""

TISSUE_HU = -500.0
AIR_HU = -1024.0
