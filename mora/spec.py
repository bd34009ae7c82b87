"""The shape layer of MoRA: types, the square size `n`, and which shapes can exist.

Everything here is plain integers; no tensors. See `MORA_SPEC.md` for the math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

from mora.errors import UnsupportedMoraTypeError, UntrainableShapeError


class MoraType(IntEnum):
    """The compress/decompress variants of the reference implementation.

    1 and 6 are the ones the paper recommends (1 for large ranks, 6 for small ones);
    2, 3 and 4 are its ablations. There is no type 5: the reference cannot run it.
    """

    SHARING = 1  # chunk-sum compress, tile decompress (paper Eq. 6)
    GROUPED = 2  # group-sum compress, repeat-each decompress
    GROUPED_TILED = 3  # group-sum compress, tile decompress
    SHARING_REPEATED = 4  # chunk-sum compress, repeat-each decompress
    ROPE = 6  # chunks rotated by RoPE, shared M, outputs concatenated (paper Eq. 9)

    @classmethod
    def parse(cls, value: object) -> MoraType:
        """`value` as a MoRA type, or `UnsupportedMoraTypeError` naming it."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise UnsupportedMoraTypeError(
                "mora_type must be an integer", expected="one of 1, 2, 3, 4, 6", found=repr(value)
            )
        try:
            return cls(value)
        except ValueError:
            raise UnsupportedMoraTypeError(
                "unsupported mora_type", expected="one of 1, 2, 3, 4, 6", found=value
            ) from None

    @property
    def chunks_input(self) -> bool:
        """Whether compress cuts the (padded) input into chunks of `n` (types 1, 4, 6)."""
        return self in (MoraType.SHARING, MoraType.SHARING_REPEATED, MoraType.ROPE)

    @property
    def tiles_output(self) -> bool:
        """Whether decompress tiles its `n` outputs (types 1, 3); types 2, 4 repeat each value."""
        return self in (MoraType.SHARING, MoraType.GROUPED_TILED)


def mora_size(in_features: int, out_features: int, r: int, mora_type: MoraType | int) -> int:
    """The side `n` of the square matrix `M`, exactly as the reference computes it.

    `n = int(sqrt((in_f + out_f) * r) + 0.5)`, rounded down to even for type 6 (RoPE).
    """
    n = int(math.sqrt((in_features + out_features) * r) + 0.5)
    if MoraType(mora_type) is MoraType.ROPE:
        n = n // 2 * 2
    return n


def group_sizes(total: int, n: int) -> list[int]:
    """Sizes of the `n` consecutive groups that types 2-4 use to split `total` features.

    The first `total - n * (total // n)` groups get one element more than the rest; when
    `total < n`, the trailing groups are empty (the reference behaves the same way).
    """
    q, m = divmod(total, n)
    return [q + 1] * m + [q] * (n - m)


@dataclass(frozen=True)
class MoraSpec:
    """The shape of one MoRA module: base layer `[out_features, in_features]`, `M` of `[n, n]`."""

    in_features: int
    out_features: int
    n: int
    mora_type: MoraType

    @classmethod
    def from_rank(cls, in_features: int, out_features: int, r: int, mora_type: MoraType | int) -> MoraSpec:
        """The spec the reference builds for a module of this shape at LoRA rank `r`."""
        t = MoraType.parse(int(mora_type))
        if r <= 0:
            raise UntrainableShapeError("rank r must be positive", expected="r >= 1", found=r)
        return cls(in_features, out_features, mora_size(in_features, out_features, r, t), t)

    @property
    def num_chunks(self) -> int:
        """`c = ceil(in_f / n)`: chunks of the padded input (types 1, 4, 6)."""
        return -(-self.in_features // self.n)

    @property
    def pad(self) -> int:
        """Features appended to the input (copies of its first ones) to fill the last chunk."""
        return (-self.in_features) % self.n if self.mora_type.chunks_input else 0

    @property
    def num_parameters(self) -> int:
        return self.n * self.n

    def check(self) -> None:
        """Raise `UntrainableShapeError` for a shape the reference implementation could not run."""
        if self.in_features <= 0 or self.out_features <= 0:
            raise UntrainableShapeError(
                "module features must be positive",
                expected="in_features, out_features >= 1",
                found=(self.in_features, self.out_features),
            )
        if self.n <= 0:
            raise UntrainableShapeError("MoRA size n must be positive", expected="n >= 1", found=self.n)
        if self.mora_type is MoraType.ROPE and self.n % 2:
            raise UntrainableShapeError("type 6 (RoPE) needs an even n", expected="even n", found=self.n)
        if self.mora_type.chunks_input and self.pad > self.in_features:
            # The reference pads with x[:pad], which is shorter than pad here: its view() fails.
            raise UntrainableShapeError(
                f"type {int(self.mora_type)} pads the input with its first {self.pad} features, "
                f"but there are only {self.in_features}",
                expected=f"in_features >= n/2 (n={self.n})",
                found=self.in_features,
            )

    def unmerged_flops_per_token(self) -> int:
        """Approximate FLOPs of the unmerged update for one token (multiply-adds count 2)."""
        if self.mora_type is MoraType.ROPE:
            c = self.num_chunks
            return 2 * c * self.n * self.n + 3 * c * self.n
        return self.in_features + 2 * self.n * self.n
