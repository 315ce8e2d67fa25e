"""Stand-alone Ray Data jobs (``python -m pipelines.NAME`` or a ``ray job submit`` entrypoint)."""
