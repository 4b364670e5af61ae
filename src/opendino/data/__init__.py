"""Image sources, the embedded synthetic world and (later) augmentation, masking and collate."""
