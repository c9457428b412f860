"""Adapters to host systems (vLLM, Ray, trainer frameworks).

Each adapter lives in its own module and is the only place that imports its host system:
``import refit`` never imports vLLM, and ``refit.adapters`` imports nothing either. Import the
module you need, e.g. ``from refit.adapters.vllm import VllmEngine``.
"""
