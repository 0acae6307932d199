"""Backbones: ResNet, Swin, the plain ViT of Co-DINO ViT-L; :mod:`codetr.models.backbones.build` picks one."""
