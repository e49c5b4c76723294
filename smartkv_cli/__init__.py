"""The `smartkv` command: the top layer, the only package that imports every other."""
