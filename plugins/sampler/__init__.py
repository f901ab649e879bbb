"""First-party sampler plugins."""
