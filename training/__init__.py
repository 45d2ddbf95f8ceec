"""Offline training: data, augmentation, losses, recipes and export of model packages."""
