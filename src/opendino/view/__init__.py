"""``opendino view``: a local web page for looking at dense features (PCA, patch similarity, text)."""
