"""The model: FlexUNet (``flexunet.py``, Keras 3) and the per-example losses."""
