"""Dataset readers (MVTec layout, classification formats, VisA) and the embedded textures generator."""
