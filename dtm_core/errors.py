"""The one error type of the engine: a human sentence that the UI and the CLI show as is."""


class DTMError(ValueError):
    """Bad input or an impossible request, explained in one sentence for the user."""
