"""overlaybd container formats: LSMT layer blobs, ZFile compression, tar wrapper."""
