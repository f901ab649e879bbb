"""First-party loss plugins."""
