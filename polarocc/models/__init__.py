"""The frozen timm backbone and its weights, the hypersphere centers and the projector."""
