"""First-party backbone plugins."""
