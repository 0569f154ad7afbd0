"""The folder for nnU-Net's ``nnUNet_extTrainer`` variable (``torchdro.integrations.nnunet``)."""
