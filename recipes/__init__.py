"""Recipes: research built on the library's public API, run from the repository root (``python -m recipes.NAME``).
Nothing in ``qwen2vl/`` imports them."""
