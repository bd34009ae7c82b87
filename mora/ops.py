"""MoRA's parameter-free compress/decompress operators and the unmerged update.

All functions act on the last dimension of their input, accept any float dtype, are
differentiable, and contain no Python loop over features, chunks or blocks: index vectors and
RoPE tables are built once per shape and cached. Numerics follow the authors' reference
implementation op for op (same summation order, `F.linear` for `M`, RoPE tables computed in
float32 and cast to the activation dtype), so float32 results agree with it to rounding.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mora.spec import MoraSpec, MoraType, group_sizes

__all__ = [
    "compress",
    "decompress",
    "mora_forward",
    "rope_chunks",
    "rope_signed_tables",
    "rope_tables",
]


@functools.lru_cache(maxsize=256)
def _group_index(total: int, n: int, device: torch.device) -> torch.Tensor:
    """`g[i]`: the group (0..n-1) of feature i when `total` features form `n` consecutive groups."""
    sizes = torch.tensor(group_sizes(total, n), device=device)
    return torch.repeat_interleave(torch.arange(n, device=device), sizes)


@functools.lru_cache(maxsize=256)
def _tile_index(total: int, period: int, device: torch.device) -> torch.Tensor:
    return torch.arange(total, device=device) % period


@functools.lru_cache(maxsize=256)
def _rope_tables_f32(n: int, c: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Exactly the reference's float32 construction; casting happens per call.
    inv_freq = 1.0 / (10000 ** (torch.arange(0, n, 2, device=device).float() / n))
    t = torch.arange(c, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rope_tables(n: int, c: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables of type 6: `(cos, sin)`, each `[c, n]`, chunk `k` at position `k`.

    Semantics::

        theta = 1.0 / (10000 ** (torch.arange(0, n, 2).float() / n))      # [n/2], float32
        a = torch.outer(torch.arange(c), theta)                            # [c, n/2]
        a = torch.cat((a, a), -1)                                          # [c, n]
        return a.cos().to(dtype), a.sin().to(dtype)
    """
    cos, sin = _rope_tables_f32(n, c, torch.device(device))
    return cos.to(dtype), sin.to(dtype)


@functools.lru_cache(maxsize=256)
def rope_signed_tables(
    n: int, c: int, k_lo: int, k_hi: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks `k_lo..k_hi-1` of the type-6 tables with the sine signed for a swap of halves
    (`rotate_half(u) * sin == swap_halves(u) * signed_sin`), what the fused kernels read.

    Semantics::

        cos, sin = rope_tables(n, c, dtype, device)
        signed_sin = torch.cat((-sin[:, :n // 2], sin[:, n // 2:]), -1)
        return cos[k_lo:k_hi].contiguous(), signed_sin[k_lo:k_hi].contiguous()
    """
    cos, sin = rope_tables(n, c, dtype, device)
    half = n // 2
    signed = torch.cat((-sin[k_lo:k_hi, :half], sin[k_lo:k_hi, half:]), -1)
    return cos[k_lo:k_hi].contiguous(), signed.contiguous()


def _pad_chunks(x: torch.Tensor, spec: MoraSpec) -> torch.Tensor:
    """`[..., in_f] -> [..., c, n]`: the input padded with its own first features, in chunks."""
    if spec.pad:
        x = torch.cat([x, x[..., : spec.pad]], dim=-1)
    return x.reshape(*x.shape[:-1], spec.num_chunks, spec.n)


def compress(x: torch.Tensor, spec: MoraSpec) -> torch.Tensor:
    """Compress `[..., in_f] -> [..., n]` for types 1-4.

    Semantics::

        if type in (1, 4):                      # chunk-sum over the padded input
            xp = torch.cat([x, x[..., :pad]], -1)            # pad = (-in_f) % n
            v = xp.reshape(*x.shape[:-1], c, n).sum(-2)
        else:                                   # types 2, 3: consecutive groups summed
            v[..., g] = x[..., group_of_feature == g].sum(-1)   # sizes from group_sizes(in_f, n)
    """
    t = spec.mora_type
    if t is MoraType.ROPE:
        raise ValueError("type 6 compresses into rotated chunks: use rope_chunks()")
    if t.chunks_input:
        return _pad_chunks(x, spec).sum(dim=-2)
    n, in_f = spec.n, spec.in_features
    q, m = divmod(in_f, n)
    lead = x.shape[:-1]
    if m == 0:
        return x.reshape(*lead, n, q).sum(dim=-1)
    big = x[..., : m * (q + 1)].reshape(*lead, m, q + 1).sum(dim=-1)
    small = x[..., m * (q + 1) :].reshape(*lead, n - m, q).sum(dim=-1)
    return torch.cat([big, small], dim=-1)


def rope_chunks(x: torch.Tensor, spec: MoraSpec) -> torch.Tensor:
    """Type 6 compress: `[..., in_f] -> [..., c, n]`, chunk `k` rotated by RoPE at position `k`.

    Semantics::

        u = torch.cat([x, x[..., :pad]], -1).reshape(*x.shape[:-1], c, n)
        cos, sin = rope_tables(n, c, x.dtype)                       # [c, n]
        return u * cos + torch.cat((-u[..., n//2:], u[..., :n//2]), -1) * sin
    """
    u = _pad_chunks(x, spec)
    cos, sin = rope_tables(spec.n, spec.num_chunks, x.dtype, x.device)
    half = spec.n // 2
    rotated_half = torch.cat((-u[..., half:], u[..., :half]), dim=-1)
    return u * cos + rotated_half * sin


def decompress(v: torch.Tensor, spec: MoraSpec) -> torch.Tensor:
    """Decompress to `[..., out_f]`.

    Semantics::

        if type in (1, 3):   out[..., j] = v[..., j % n]                        # v: [..., n]
        if type in (2, 4):   out[..., j] = v[..., group_of_output(j)]          # group_sizes(out_f, n)
        if type == 6:        flat = v.reshape(*v.shape[:-2], c * n)             # v: [..., c, n]
                             out[..., j] = flat[..., j % (c * n)]               # truncate or tile
    """
    out_f = spec.out_features
    t = spec.mora_type
    if t is MoraType.ROPE:
        flat = v.reshape(*v.shape[:-2], -1)
        if flat.shape[-1] >= out_f:
            return flat[..., :out_f]
        return flat.index_select(-1, _tile_index(out_f, flat.shape[-1], v.device))
    if t.tiles_output:
        if out_f <= spec.n:
            return v[..., :out_f]
        return v.index_select(-1, _tile_index(out_f, spec.n, v.device))
    return v.index_select(-1, _group_index(out_f, spec.n, v.device))


def mora_forward(x: torch.Tensor, M: torch.Tensor, spec: MoraSpec) -> torch.Tensor:
    """The unmerged MoRA update of one module (no base layer, scaling 1).

    Shapes: `x [..., in_f]`, `M [n, n]` -> `[..., out_f]`.

    Semantics::

        if type == 6:  return decompress(rope_chunks(x) @ M.T)      # [..., c, n] -> [..., out_f]
        else:          return decompress(compress(x) @ M.T)         # [..., n]    -> [..., out_f]
    """
    if spec.mora_type is MoraType.ROPE:
        return decompress(F.linear(rope_chunks(x, spec), M), spec)
    return decompress(F.linear(compress(x, spec), M), spec)
