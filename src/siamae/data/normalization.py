"""The ImageNet mean and standard deviation every encoder input is normalised with (the
published encoders were trained on it); the one definition, imported where images are
normalised, pictured or exported."""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
