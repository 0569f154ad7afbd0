"""Thin adapters for training frameworks. Each is optional and imported on its own:
``torchdro.integrations.lightning`` (pip install torchdro[lightning]),
``torchdro.integrations.monai`` (pip install torchdro[monai]),
``torchdro.integrations.nnunet`` (pip install torchdro[nnunet]) and
``torchdro.integrations.transformers`` (pip install torchdro[transformers]). The core never
imports them.
"""
