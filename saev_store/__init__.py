"""saev-store: a Zarr v3 activation store for vision models."""
__version__ = "0.1.0"
