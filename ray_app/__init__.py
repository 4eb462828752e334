"""restage core: config and profiles, records, storage, model registry, prompt bank, CLI."""

__version__ = "0.1.0"
