"""One exception type that carries its exit code, so every layer can fail with a verdict.

The CLI turns a `TrainerError` into the process exit status and the termination message;
code deeper down never calls `sys.exit`, which keeps it testable as plain functions.
"""

from __future__ import annotations

from lora_operator.contract import ExitCode


class TrainerError(Exception):
    """A failure whose exit code (and so the operator's next move) is already known."""

    def __init__(self, code: ExitCode, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code.reason}: {message}")


def is_cuda_oom(exc: BaseException) -> bool:
    """True for `torch.cuda.OutOfMemoryError` and the older RuntimeError spelling of it."""
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (isinstance(exc, RuntimeError)
                                          and "CUDA out of memory" in str(exc))
