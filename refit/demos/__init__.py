"""Runnable demonstrations (``refit demo``) and the tiny models they and the tests build.

Scaffolding, kept apart from the library: no library module imports this package (an
import-linter contract in ``pyproject.toml``); only the ``refit`` command does.
"""
