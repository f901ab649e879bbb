"""First-party index plugins."""
