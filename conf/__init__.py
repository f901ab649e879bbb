"""Hydra config files of embplex and its first-party plugins."""
