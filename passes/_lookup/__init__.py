"""The lookup finder and binder behind ``fuse_memory_lookup`` (not passes themselves)."""
