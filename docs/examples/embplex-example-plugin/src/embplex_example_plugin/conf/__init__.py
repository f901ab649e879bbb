"""Hydra config files of embplex-example-plugin, found through ``pkg://embplex_example_plugin.conf``."""
