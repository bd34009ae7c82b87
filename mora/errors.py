"""Exception types of the mora library.

Every error that a user can cause (a malformed adapter, a wrong shape, a merge that would
overflow) has its own type, so that callers (the gRPC server maps them to status codes in one
place) can react precisely without parsing messages. Messages always name the adapter and the
module involved, and give the expected and found values where there are any.
"""

from __future__ import annotations

from typing import Any


class MoraError(Exception):
    """Base class of every error raised by the mora library."""


class AdapterError(MoraError):
    """Something is wrong with one adapter (its files, its config or its tensors)."""

    def __init__(
        self,
        message: str,
        *,
        adapter: str | None = None,
        module: str | None = None,
        expected: Any = None,
        found: Any = None,
    ) -> None:
        self.adapter = adapter
        self.module = module
        self.expected = expected
        self.found = found
        self.detail = message
        parts = []
        if adapter is not None:
            parts.append(f"adapter {adapter!r}")
        if module is not None:
            parts.append(f"module {module!r}")
        text = message
        if expected is not None or found is not None:
            text += f" (expected {expected}, found {found})"
        super().__init__(f"{', '.join(parts)}: {text}" if parts else text)

    def with_context(self, *, adapter: str | None = None, module: str | None = None) -> AdapterError:
        """The same error with the adapter/module filled in where it was unknown."""
        return type(self)(
            self.detail,
            adapter=self.adapter if self.adapter is not None else adapter,
            module=self.module if self.module is not None else module,
            expected=self.expected,
            found=self.found,
        )


class AdapterNotFoundError(AdapterError):
    """The adapter directory or one of its required files does not exist."""


class AdapterConfigError(AdapterError):
    """`adapter_config.json` is unreadable, has wrong types or unsupported options."""


class NotMoraAdapterError(AdapterConfigError):
    """The adapter is an ordinary LoRA adapter (no `use_mora: true`)."""


class UnsupportedMoraTypeError(AdapterConfigError):
    """`mora_type` is not one of the types the reference implementation can run (1, 2, 3, 4, 6)."""


class AdapterWeightsError(AdapterError):
    """The weights file is unreadable, has unexpected keys or non-float tensors."""


class TiedWeightMismatchError(AdapterWeightsError):
    """The duplicated `lora_B` copy differs from `lora_A` (the reference saves identical copies)."""


class NonFiniteWeightsError(AdapterWeightsError):
    """A tensor holds NaN or infinity."""


class ShapeMismatchError(AdapterError):
    """A tensor's shape disagrees with the shape MoRA's formula gives for the base module."""


class UntrainableShapeError(AdapterError):
    """A (module shape, rank, type) combination the reference implementation could never run."""


class MissingModuleError(AdapterError):
    """A base-model module matched by `target_modules` has no weights in the checkpoint."""


class UnexpectedModuleError(AdapterError):
    """The checkpoint holds weights for a module the base model does not have or does not target."""


class MergeError(MoraError):
    """A merge or unmerge cannot be performed."""


class NonFiniteMergeError(MergeError):
    """A merge in safe mode would have produced non-finite weights; nothing was changed."""


class AdapterPathError(AdapterError):
    """A file of the adapter is not a regular file inside the folder it may be read from."""


class UpdateTooLargeError(AdapterWeightsError):
    """The update of a module is too large relative to its base layer (see `mora.containment`)."""



class QuantizationUnsupportedError(MoraError):
    """The base model's quantization needs a kernel this machine cannot run (e.g. vLLM's AVX2 CPU
    kernels have no W4A16 GEMM); the engine refuses to start rather than die at the first step."""
