"""Running a pipeline over files: input discovery, output naming, resuming, progress."""
