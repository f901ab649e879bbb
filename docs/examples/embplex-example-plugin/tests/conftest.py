# The fixtures embplex ships for plugin tests (tiny models, an isolated registry).
pytest_plugins = ["embplex.testing"]
