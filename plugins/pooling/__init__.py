"""First-party pooling plugins."""
