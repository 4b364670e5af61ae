"""The data pipeline: image sources, the embedded synthetic world, multi-crop augmentation, masking, collate
and the device stage."""
