"""Release tools (the bundled models, their card, tiny test models): not installed, run from a checkout's root as
``python -m tools.make_tiny_model`` etc. (docs/architecture.md, Layout)."""
