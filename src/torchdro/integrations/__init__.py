"""Thin adapters for training frameworks. Each is optional and imported on its own:
``torchdro.integrations.lightning`` (pip install torchdro[lightning]) and
``torchdro.integrations.monai`` (pip install torchdro[monai]). The core never imports them.
"""
