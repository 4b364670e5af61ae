"""The normalisation statistics of images (one definition): ImageNet's mean and std, which the LVD-1689M
models and the training default use. Free of heavy imports, so the model registry can read it."""

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
