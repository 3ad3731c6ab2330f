"""Subcommands that run the model (added by the generation engine)."""


def register(sub) -> None:
    return None
