"""Lightning 1.x's published examples ported to fastloop by changing their imports only.

Replacing the word ``fastloop`` by ``pytorch_lightning`` in any of these files gives back the
Lightning script (``scripts/lightning_oracle.py`` does that and runs both). MNIST downloads are
replaced by random tensors of the same shapes; nothing else is meant to differ.
"""
