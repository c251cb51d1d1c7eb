"""Command-line interface: ``quantizable VERB ...``."""
