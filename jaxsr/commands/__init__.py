"""Subcommands of the `jaxsr` command line."""
