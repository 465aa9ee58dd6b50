"""`gemma4 eval` (being written)."""


def register(app):
    pass
