"""Reproducible ERM-vs-DRO studies (``torchdro experiment ...``).

Optional: they need ``pip install torchdro[experiments]`` (scikit-learn, matplotlib, tqdm),
and the 3D study also MONAI (``torchdro[seg3d]``). The core never imports this package.
"""
