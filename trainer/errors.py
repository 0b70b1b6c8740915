"""One exception type that carries its exit code, so every layer can fail with a verdict.

The CLI turns a `TrainerError` into the process exit status and the termination message;
code deeper down never calls `sys.exit`, which keeps it testable as plain functions.
"""

from __future__ import annotations

import re

from lora_operator.contract import ExitCode

# A URL's query string (presigned S3/GCS/Azure URLs carry their signature and credential
# there): everything from "?" to the next space or quote.
_URL_QUERY = re.compile(r"""(\b[a-z][a-z0-9+.-]*://[^\s?#'"<>]*)\?[^\s'"<>]*""", re.IGNORECASE)
REDACTED = "?<redacted>"


def redact(text: str) -> str:
    """`text` with the query string of every URL in it replaced: a presigned URL's signature
    is a credential and must not reach logs, status, events or the model card."""
    return _URL_QUERY.sub(lambda m: m.group(1) + REDACTED, text)


class TrainerError(Exception):
    """A failure whose exit code (and so the operator's next move) is already known."""

    def __init__(self, code: ExitCode, message: str):
        self.code = code
        self.message = redact(message)
        super().__init__(f"{code.reason}: {self.message}")


def is_cuda_oom(exc: BaseException) -> bool:
    """True for `torch.cuda.OutOfMemoryError` and the older RuntimeError spelling of it."""
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (isinstance(exc, RuntimeError)
                                          and "CUDA out of memory" in str(exc))


def classify(exc: BaseException) -> tuple[ExitCode, str]:
    """The exit code and message for an exception that escaped the run.

    Only GPU memory exhaustion is OUT_OF_MEMORY: the operator answers it with a bigger VRAM
    class or QLoRA, which does nothing for a pod that ran out of host RAM (MemoryError), so
    that is an ordinary retryable failure naming the pod's memory instead.
    """
    if isinstance(exc, TrainerError):
        return exc.code, exc.message
    if is_cuda_oom(exc):
        return ExitCode.OUT_OF_MEMORY, redact(f"CUDA out of memory: {str(exc)[:300]}")
    if isinstance(exc, MemoryError):
        return ExitCode.INTERNAL, ("host memory (RAM) exhausted, not GPU memory: raise the "
                                   "trainer pod's memory (operator setting trainerMemory)")
    if isinstance(exc, RecursionError):
        return ExitCode.INTERNAL, "RecursionError: input nested too deeply"
    return ExitCode.INTERNAL, redact(f"{type(exc).__name__}: {exc}")
