"""How every script's entry point ends: a mistake of the user's is one sentence, a bug a traceback.

A script's `@hydra.main` function is one line, `return run_command(plain_function, cfg)`. Hydra
prints the traceback of any exception its job raises, but lets SystemExit through: a user's
error leaves as `SystemExit("Error: <sentence>")`, which Python prints to stderr before exiting
with status 1. HYDRA_FULL_ERROR=1 (Hydra's own switch for complete stack traces) keeps the
traceback of these too.
"""

import os
from collections.abc import Callable
from typing import TypeVar

from hydra.errors import InstantiationException

from tokenizer.base.files import WriteError
from tokenizer.base.optim import NonFiniteLossError

Result = TypeVar("Result")

# What a wrong path, value or input raises, the project's own errors included (RunMismatchError,
# ShardMismatchError and ModelTooLargeError are ValueErrors; MissingWeightsError and
# MissingCLIPWeightsError are FileNotFoundErrors).
USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    ConnectionError,
    WriteError,
    NonFiniteLossError,
)


def user_error(error: BaseException) -> BaseException | None:
    """The user's error behind `error`, or None: a config value Hydra's instantiate refused
    is the error its target raised."""
    if isinstance(error, InstantiationException):
        error = error.__cause__
    return error if isinstance(error, USER_ERRORS) else None


def run_command(function: Callable[..., Result], *args) -> Result:
    """`function(*args)`, where a user's error exits with its sentence and no traceback."""
    try:
        return function(*args)
    except Exception as error:
        found = user_error(error)
        if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"Error: {found}") from None
