"""Developer tools that sit beside the data path (they use the package; the package never uses them)."""
