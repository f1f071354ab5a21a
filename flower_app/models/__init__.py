"""Models: the model factory (DINO ViT-S/16, tiny ViT), weights loading, the backbone cache."""
