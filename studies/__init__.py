"""The published studies (docs/results.md) over the ``toolkit`` commands: not installed, run from a checkout's root
as ``python -m studies.repro_adm`` etc. (docs/architecture.md, Layout)."""
