"""The dense weight update `delta_W [out_f, in_f]` of a MoRA module, built without loops.

Every MoRA type is linear in `x`, so `mora_forward(x, M) == x @ delta_weight(M).T`. The structure
of `delta_W` is what makes merging cheap:

* types 1-4: `delta_W = D @ M @ C` with 0/1 matrices, i.e. row `j` of `delta_W` is row `d(j)`
  of the small `[n, in_f]` matrix `M @ C` (`compressed_rows`);
* type 6: block-diagonal; row `j` touches only the `w = min(n, in_f)` columns of its chunk
  (`rope_row_updates`), so a merge changes `out_f * w` elements, not `out_f * in_f`.

Sums are formed in float32 (float64 if `M` is float64) and rounded once.
"""

from __future__ import annotations

import functools

import torch

from mora.ops import _group_index, _tile_index, rope_tables
from mora.spec import MoraSpec, MoraType

__all__ = ["compressed_rows", "delta_weight", "output_row_index", "rope_blocks", "rope_chunks_used", "rope_row_updates"]


def rope_chunks_used(spec: MoraSpec) -> int:
    """How many input chunks of a type-6 module feed at least one output."""
    return min(spec.num_chunks, -(-spec.out_features // spec.n))


def _compute_dtype(M: torch.Tensor) -> torch.dtype:
    return torch.float64 if M.dtype == torch.float64 else torch.float32


def compressed_rows(M: torch.Tensor, spec: MoraSpec) -> torch.Tensor:
    """`M @ C`, `[n, in_f]` in float32 (types 1-4): what each compressed row reads from `x`.

    Semantics::

        C = torch.stack([compress(e_i, spec) for e_i in torch.eye(in_f)], 1)   # [n, in_f]
        return M.float() @ C
    """
    Mf = M.to(_compute_dtype(M))
    n, in_f = spec.n, spec.in_features
    if spec.mora_type.chunks_input:
        # Feature i sits at padded position i (chunk slot i % n); the first `pad` features
        # also fill the tail of the last chunk, slots n-pad .. n-1.
        c = spec.num_chunks
        out = torch.empty(n, c * n, dtype=Mf.dtype, device=Mf.device)
        out.view(n, c, n).copy_(Mf[:, None, :])
        out = out[:, :in_f]
        if spec.pad:
            out[:, : spec.pad] += Mf[:, n - spec.pad :]
        return out
    q, m = divmod(in_f, n)
    return torch.cat([Mf[:, :m].repeat_interleave(q + 1, dim=1), Mf[:, m:].repeat_interleave(q, dim=1)], dim=1)


def output_row_index(spec: MoraSpec) -> torch.Tensor:
    """`d [out_f]`: row `j` of `delta_W` equals row `d[j]` of `compressed_rows` (types 1-4)."""
    if spec.mora_type.tiles_output:
        return _tile_index(spec.out_features, spec.n, torch.device("cpu"))
    return _group_index(spec.out_features, spec.n, torch.device("cpu"))


@functools.lru_cache(maxsize=64)
def _rope_layout(in_f: int, out_f: int, n: int, c: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Column layout of type 6's blocks.

    Returns `cols [c, w]` (the sorted columns chunk k touches), `slot [c*n]` (for padded
    position k*n+q, the index within `cols[k]` it lands on) and `chunk_of_row [out_f]`.
    """
    w = min(n, in_f)
    pos = torch.arange(c * n, device=device)
    src = torch.where(pos < in_f, pos, pos - in_f)  # padded position -> input feature
    chunk = pos // n
    # Within each chunk, the touched columns sorted ascending; `slot` locates each source in them.
    key = chunk * (in_f + 1) + src
    order = torch.argsort(key)
    sorted_key = key[order]
    first = torch.ones_like(sorted_key, dtype=torch.bool)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    uniq_rank = torch.cumsum(first.long(), 0) - 1  # global rank among unique (chunk, col)
    chunk_start = torch.searchsorted(sorted_key, torch.arange(c, device=device) * (in_f + 1))
    start_rank = uniq_rank[chunk_start]  # [c]
    slot = torch.empty_like(pos)
    slot[order] = uniq_rank - start_rank[chunk[order]]
    cols = torch.empty(c, w, dtype=torch.long, device=device)
    cols[chunk[order][first], slot[order][first]] = src[order][first]
    chunk_of_row = (torch.arange(out_f, device=device) % (c * n)) // n
    return cols, slot, chunk_of_row


def rope_blocks(
    M: torch.Tensor, spec: MoraSpec, table_dtype: torch.dtype | None = None, chunks: int | None = None
) -> torch.Tensor:
    """Type 6: `B [c, n, n]`, the map from chunk `k` of the padded input to its outputs.

    `chunks` limits it to the first chunks (when `out_f < c * n` the rest feed no output).

    `B[k] = M @ R_k` with `R_k` the RoPE rotation at position k. The tables are rounded to
    `table_dtype` (default `M.dtype`) first, as the reference does for the activation dtype.

    Semantics::

        cos, sin = rope_tables(n, c, table_dtype)
        M2 = torch.cat((M[:, n//2:], -M[:, :n//2]), 1)
        B[k] = M * cos[k] + M2 * sin[k]
    """
    cd = _compute_dtype(M)
    cos, sin = rope_tables(spec.n, spec.num_chunks, table_dtype or M.dtype, M.device)
    if chunks is not None:
        cos, sin = cos[:chunks], sin[:chunks]
    Mf = M.to(cd)
    half = spec.n // 2
    M2 = torch.cat((Mf[:, half:], -Mf[:, :half]), dim=1)
    return torch.addcmul(Mf[None] * cos.to(cd)[:, None, :], M2[None], sin.to(cd)[:, None, :])


def rope_row_updates(
    M: torch.Tensor, spec: MoraSpec, table_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Type 6 as sparse rows: `(cols, vals)`, each `[out_f, w]`, `w = min(n, in_f)`.

    `delta_W[j, cols[j]] = vals[j]` and every other element of `delta_W` is zero. Columns that
    the padding makes a chunk read twice are folded into one value.
    """
    c, n, w = spec.num_chunks, spec.n, min(spec.n, spec.in_features)
    cols, slot, chunk_of_row = _rope_layout(spec.in_features, spec.out_features, n, c, M.device)
    B = rope_blocks(M, spec, table_dtype)  # [c, n(out), n(in)]
    folded = torch.zeros(c, n, w, dtype=B.dtype, device=M.device)
    # Flatten (chunk, in) so one index_add folds every chunk at once.
    chunk_index = torch.arange(c * n, device=M.device) // n
    target = chunk_index * w + slot
    folded = folded.permute(1, 0, 2).reshape(n, c * w)
    folded.index_add_(1, target, B.permute(1, 0, 2).reshape(n, c * n))
    folded = folded.reshape(n, c, w).permute(1, 0, 2)  # [c, n, w]
    row = torch.arange(spec.out_features, device=M.device)
    vals = folded[chunk_of_row, row % n]  # [out_f, w]
    return cols[chunk_of_row], vals


def delta_weight(M: torch.Tensor, spec: MoraSpec, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense update `[out_f, in_f]` such that `mora_forward(x, M, spec) == x @ delta.T`.

    Computed in float32 (float64 for float64 `M`) and returned in `dtype` (default `M.dtype`).

    Semantics::

        delta = torch.stack([mora_forward(e_i, M, spec) for e_i in torch.eye(in_f)], 1)
    """
    dtype = dtype or M.dtype
    if spec.mora_type is MoraType.ROPE:
        cols, vals = rope_row_updates(M, spec, table_dtype=dtype)
        out = torch.zeros(spec.out_features, spec.in_features, dtype=vals.dtype, device=M.device)
        return out.scatter_(1, cols, vals).to(dtype)
    rows = compressed_rows(M, spec)
    return rows.index_select(0, output_row_index(spec).to(M.device)).to(dtype)
