"""The one error type of the engine: a human sentence that the UI and the CLI show as is."""


class DTMError(ValueError):
    """Bad input or an impossible request, explained in one sentence for the user."""


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def user_error(exc: BaseException, what: str = "this job") -> DTMError | None:
    """The DTMError a user should see for ``exc``: itself, or out-of-memory explained (after
    releasing cached memory); None for anything else."""
    if isinstance(exc, DTMError):
        return exc
    if not is_out_of_memory(exc):
        return None
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return DTMError(f"Ran out of memory while {what}: use fewer prompts, fewer new tokens or a "
                    "smaller batch, a smaller model, or a device with more memory.")
