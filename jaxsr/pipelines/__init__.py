"""End-to-end super-resolution pipelines."""
