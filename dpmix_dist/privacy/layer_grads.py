"""Per-group gradients, their squared norms and clipped sums, one closed form per layer type.

The math of the layer-wise engine (`layerwise.py`), which owns the hooks, the book-keeping and the choice of path and
calls these functions. Each takes what one layer's forward saw (its input A, detached) and what the backward gave
(B = ∂L/∂output) for n groups of G members, and returns per-group gradients (n, ...), squared norms (n,), or the
clipped sum Σ_i c_i g_i. No state, no hooks, no choice: every function here is exact for the inputs it is given.

A group's gradient for a Linear is Σ_t B_t A_tᵀ over the group's t tokens (its members' tokens joined, `tokens`), so
it is either formed (*direct*) or only its squared norm is, Σ_{s,t} (A_s·A_t)(B_s·B_t) (*ghost norm*, `gram_dot`), with
A and B kept to form Σ_i c_i g_i once the clip factors c_i are known (*book-keeping*). A convolution is a Linear over
unfolded patches, which are unfolded only where that is the cheaper way. Products are formed in fp32; A and B may be
kept in a lower precision (bf16 under autocast).

Imports torch only. Every form is tested, each path forced, against the naive per-group loop through the engine
(tests/test_layerwise.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------- shapes and norms


def tokens(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(b·G, ..., d) -> (b, G·T, d): the group's members' tokens joined on one axis."""
    return x.reshape(num_groups, -1, x.shape[-1])


def join(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(b·G, C, L) -> (b, C, G·L): the group's members' positions joined on the last axis (a view when G = 1)."""
    members, c, length = x.shape
    if members == num_groups:
        return x
    return x.reshape(num_groups, -1, c, length).transpose(1, 2).reshape(num_groups, c, -1)


def gram_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_{s,t} (a_s·a_t)(b_s·b_t) for a (n, t, d), b (n, t, p): ‖b_iᵀ a_i‖² without forming b_iᵀ a_i."""
    return (torch.bmm(a, a.mT) * torch.bmm(b, b.mT)).sum((1, 2))


def sq_norms(g: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (n,) squared L2 norms, in fp32."""
    return g.float().flatten(1).pow(2).sum(1)


def weighted_sum(factors: torch.Tensor, per_group: torch.Tensor) -> torch.Tensor:
    """Σ_i c_i g_i of per-group gradients (n, ...), flattened to (numel,), in fp32."""
    return torch.matmul(factors, per_group.float().flatten(1))


# ---------------------------------------------------------------------------------------- Linear


def linear_ghost_norm_sq(a: torch.Tensor, b: torch.Tensor, with_bias: bool) -> torch.Tensor:
    """Squared norms of [weight | bias] per group from a (n, t, d_in), b (n, t, d_out) in fp32: [weight | bias] is one
    Linear over [A | 1], so the bias adds 1 to every entry of A's Gram."""
    a_gram = torch.bmm(a, a.mT)
    if with_bias:
        a_gram += 1
    return (a_gram * torch.bmm(b, b.mT)).sum((1, 2))


def linear_per_group(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, d_out, d_in) per-group weight gradients Σ_t B_t A_tᵀ from a (n, t, d_in), b (n, t, d_out)."""
    return torch.bmm(b.mT, a)


def linear_clipped_sum(
    a: torch.Tensor, b: torch.Tensor, factors: torch.Tensor, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ_i c_i g_i of a Linear's weight (d_out, d_in) and bias (d_out,) from A (n, t, d_in) and B (n, t, d_out): the
    weight gradient with each group's A or B, whichever is smaller, scaled by its factor; the bias from B."""
    a, b = a.float(), b.float()
    scale_b = a.numel() > b.numel()
    if scale_b:
        b = b * factors.view(-1, 1, 1)
    else:
        a = a * factors.view(-1, 1, 1)
    weight = b.reshape(-1, b.shape[-1]).mT @ a.reshape(-1, a.shape[-1])
    if not with_bias:
        return weight, None
    return weight, b.sum((0, 1)) if scale_b else factors @ b.sum(1)


# ---------------------------------------------------------------------------------------- norms and scales


def layer_norm_grads(
    x: torch.Tensor, gy: torch.Tensor, mod: nn.Module, num_groups: int, channels_first: bool
) -> dict[str, torch.Tensor]:
    """Per-group weight and bias gradients (n, d) of a LayerNorm over the last axis (channels_first: axis 1 of
    (n, C, H, W)), from its input x and B in fp32: Σ x̂·B and Σ B over the group's positions."""
    if channels_first:
        x, gy = x.permute(0, 2, 3, 1), gy.permute(0, 2, 3, 1)
    xhat = F.layer_norm(x, mod.normalized_shape, eps=mod.eps)
    xhat, gy = xhat.reshape(num_groups, -1, xhat.shape[-1]), gy.reshape(num_groups, -1, gy.shape[-1])
    return {"weight": (xhat * gy).sum(1), "bias": gy.sum(1)}


def group_norm_grads(x: torch.Tensor, gy: torch.Tensor, mod: nn.Module, num_groups: int) -> dict[str, torch.Tensor]:
    """Per-group weight and bias gradients (n, C) of a GroupNorm of (n·G, C, H, W), from its input x and B in fp32."""
    xhat = F.group_norm(x, mod.num_groups, eps=mod.eps)
    c, hw = xhat.shape[1], xhat[0, 0].numel()
    xhat, gy = xhat.reshape(num_groups, -1, c, hw), gy.reshape(num_groups, -1, c, hw)
    return {"weight": (xhat * gy).sum((1, 3)), "bias": gy.sum((1, 3))}


def scale_grads(x: torch.Tensor, gy: torch.Tensor, num_groups: int, channels_first: bool) -> torch.Tensor:
    """Per-group gradient (n, C) of out = x * gamma over the channel axis (axis 1 of (n, C, ...) or the last axis)."""
    if channels_first:
        return (x * gy).reshape(num_groups, -1, x.shape[1], x[0, 0].numel()).sum((1, 3))
    return (x * gy).reshape(num_groups, -1, x.shape[-1]).sum(1)


def convnext_gamma_grads(y: torch.Tensor, gy: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-group gradient (n, C) of a ConvNeXt block's gamma: Σ_hw y_c · ∂L/∂(γy)_c, y (n·G, C, H, W)."""
    return (y * gy).reshape(num_groups, -1, gy.shape[1], gy[0, 0].numel()).sum((1, 3))


def vit_token_grads(vit: nn.Module, gz: torch.Tensor, num_groups: int) -> dict[str, torch.Tensor]:
    """Per-group gradients of a ViT's cls_token / reg_token / pos_embed from ∂L/∂z, z = the embedded sequence
    (pos_embed added as is: the engine refuses a resampled one)."""
    gz = gz.float()
    g = gz.reshape(num_groups, -1, *gz.shape[1:]).sum(1)  # (n, T, D): the group's views summed
    num_cls = 1 if vit.cls_token is not None else 0
    num_reg = vit.reg_token.shape[1] if vit.reg_token is not None else 0
    grads = {}
    if num_cls:
        grads["cls_token"] = g[:, :1]
    if num_reg:
        grads["reg_token"] = g[:, num_cls : num_cls + num_reg]
    if vit.pos_embed is not None:
        grads["pos_embed"] = g[:, vit.num_prefix_tokens :] if vit.no_embed_class else g
    return grads


# ---------------------------------------------------------------------------------------- Embedding


def embedding_ghost(
    ids: torch.Tensor, gy: torch.Tensor, mod: nn.Embedding, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ghost norm of an embedding lookup, ‖G_i‖² = Σ_{s,t} [id_s = id_t] (B_s·B_t) over the group's tokens; returns
    (ids (n, T), B (n, T, D) in fp32, squared norms), the first two for `embedding_clipped_sum`."""
    ids = ids.reshape(num_groups, -1).long()
    b = gy.float().reshape(num_groups, ids.shape[1], mod.embedding_dim)
    if mod.padding_idx is not None:  # the padding row receives no gradient
        b = b * (ids != mod.padding_idx).unsqueeze(-1)
    same = ids.unsqueeze(2) == ids.unsqueeze(1)
    return ids, b, (torch.bmm(b, b.mT) * same).sum((1, 2))


def embedding_clipped_sum(ids: torch.Tensor, b: torch.Tensor, factors: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Σ_i c_i g_i of an embedding's weight: each group's B rows, scaled, added at its ids."""
    scaled = (b * factors.view(-1, 1, 1)).reshape(-1, b.shape[-1])
    return torch.zeros(shape, device=b.device).index_add_(0, ids.reshape(-1), scaled)


# ---------------------------------------------------------------------------------------- Conv2d


def pad_same(x: torch.Tensor, kernel: tuple, stride: tuple, dilation: tuple) -> torch.Tensor:
    """TensorFlow 'same' padding (timm's Conv2dSame pads in forward, the extra pixel right/bottom)."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel, stride, dilation):
        total = max((-(size // -s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom))


def pad_static(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Conv2d's own padding, as its forward applies it: 'same' (the odd pixel right/bottom), 'valid', or (h, w), with
    zeros or its padding_mode."""
    if conv.padding == "valid":
        return x
    if conv.padding == "same":
        totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        (top, bottom), (left, right) = ((t // 2, t - t // 2) for t in totals)
    else:
        (top, bottom), (left, right) = ((p, p) for p in conv.padding)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, (left, right, top, bottom), mode=mode)


def conv_input(conv: nn.Conv2d, x: torch.Tensor, same_pad: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """The input as the convolution reads it and the zero padding left to apply: (0, 0) where this replays it.
    same_pad: timm's TF-style 'same' convolution, which pads inside forward, asymmetrically."""
    if same_pad:
        return pad_same(x, conv.kernel_size, conv.stride, conv.dilation), (0, 0)
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return pad_static(x, conv), (0, 0)
    return x, tuple(conv.padding)


def windows_disjoint(conv: nn.Conv2d, padding: tuple[int, int]) -> bool:
    """No padding left to apply, no dilation, and a stride at least the kernel (a 1×1 convolution, a ViT's patch
    embedding): each pixel is read by at most one window, so its columns are a strided view of the input and hold no
    more numbers than it."""
    return (
        padding == (0, 0)
        and tuple(conv.dilation) == (1, 1)
        and all(s >= k for s, k in zip(conv.stride, conv.kernel_size))
    )


def window_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(members, L, C_in·kh·kw): the windows of a convolution whose windows are disjoint (`windows_disjoint`), one row
    per output position, each in F.unfold's order (channel, kernel row, kernel column), read through a strided view of
    x and copied once. Rows, not F.unfold's columns: the copy then moves runs of kw contiguous pixels (a 16×16 patch
    embedding of 32 images at 32 px on one core: 57 µs, against 0.7 ms for F.unfold and 1 ms for columns)."""
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    members, channels, height, width = x.shape
    out_h, out_w = (height - kh) // sh + 1, (width - kw) // sw + 1
    s_m, s_c, s_h, s_w = x.stride()
    windows = x.as_strided(
        (members, out_h, out_w, channels, kh, kw), (s_m, s_h * sh, s_w * sw, s_c, s_h, s_w), x.storage_offset()
    )
    return windows.reshape(members, out_h * out_w, channels * kh * kw)


def conv_columns(conv: nn.Conv2d, padded: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """(members, C_in·kh·kw, L) in fp32: a 1×1 convolution's strided pixels (a view), the windows of another
    convolution whose windows are disjoint (a transposed view of `window_rows`), else the unfolded patches."""
    if windows_disjoint(conv, padding):
        if conv.kernel_size == (1, 1):
            return padded[:, :, :: conv.stride[0], :: conv.stride[1]].float().flatten(2)
        return window_rows(conv, padded.float()).mT
    return F.unfold(padded.float(), conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)


def conv_bias_grads(gy: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-group bias gradients (n, C_out) from B (members, C_out, H, W) in fp32."""
    return gy.sum((2, 3)).reshape(num_groups, -1, gy.shape[1]).sum(1)


def conv_per_group_from_columns(
    cols: torch.Tensor, gy: torch.Tensor, num_groups: int, shape: torch.Size
) -> torch.Tensor:
    """Per-group weight gradients (n, *shape) by one batched matmul over the group's joined columns and B."""
    a, b = join(cols, num_groups), join(gy.flatten(2), num_groups)
    return torch.bmm(b, a.mT).reshape(num_groups, *shape)


def conv_per_group_by_kernel(
    conv: nn.Conv2d, padded: torch.Tensor, padding: tuple[int, int], gy: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """Per-group weight gradients by the convolution's own weight-gradient kernel, one call per group's members."""
    per = gy.shape[0] // num_groups
    return torch.stack(
        [
            torch.nn.grad.conv2d_weight(
                padded[i * per : (i + 1) * per].float(),
                conv.weight.shape,
                gy[i * per : (i + 1) * per],
                conv.stride,
                padding,
                conv.dilation,
            )
            for i in range(num_groups)
        ]
    )


def conv_ghost_norm_sq(cols: torch.Tensor, gy: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Ghost norms of a convolution's weight: the Grams of the group's joined columns and B over positions."""
    a, b = join(cols, num_groups), join(gy.flatten(2), num_groups)
    return gram_dot(a.mT, b.mT)


def grouped_conv_per_group(
    conv: nn.Conv2d, padded: torch.Tensor, padding: tuple[int, int], gy: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """Per-group weight gradients of a grouped convolution (small: formed directly) from unfolded patches."""
    members, length = gy.shape[0], gy[0, 0].numel()
    cols = F.unfold(padded.float(), conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    a = cols.reshape(members, conv.groups, -1, length)  # (nG, g, C_in/g·k·k, L)
    b = gy.reshape(members, conv.groups, -1, length)  # (nG, g, C_out/g, L)
    return torch.einsum("vgol,vgil->vgoi", b, a).reshape(num_groups, -1, *conv.weight.shape).sum(1)


def depthwise_per_member(conv: nn.Conv2d, x: torch.Tensor, padding: tuple[int, int], gy: torch.Tensor) -> torch.Tensor:
    """Per-member weight gradients (members, C, 1, kh, kw) of a depthwise convolution without unfolding patches
    (F.unfold of kh·kw copies of a many-channel input was most of EfficientNet-Lite0's clipping time): per kernel
    offset, Σ_hw B · the pixels it reads; or, on a map with fewer positions than offsets, per output position,
    B · the window it read."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    out_h, out_w = gy.shape[2:]
    if out_h * out_w < kh * kw:
        w = x.new_zeros(x.shape[0], x.shape[1], kh, kw)
        for i in range(out_h):
            for j in range(out_w):
                window = x[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
                w += window * gy[:, :, i : i + 1, j : j + 1]
        return w.unsqueeze(2)
    w = x.new_empty(x.shape[0], x.shape[1], kh, kw)
    for i in range(kh):
        for j in range(kw):
            seen = x[:, :, i * dh : i * dh + sh * (out_h - 1) + 1 : sh, j * dw : j * dw + sw * (out_w - 1) + 1 : sw]
            w[:, :, i, j] = (seen * gy).sum((2, 3))
    return w.unsqueeze(2)


def conv_clipped_sum(
    conv: nn.Conv2d, x: torch.Tensor, gy: torch.Tensor, factors: torch.Tensor, same_pad: bool
) -> torch.Tensor:
    """Σ_i c_i g_i of a convolution's weight from its kept input x and B (members, ...): the convolution's own
    weight-gradient kernel with each member's x or B (whichever is smaller) scaled by its group's factor; a convolution
    whose windows are disjoint (1×1, a patch embedding) by one matmul over its windows (several times faster there:
    for a ViT-Tiny's 16×16 patch embedding of 32 images at 32 px on one core, 0.9 ms against the kernel's 2.4 ms)."""
    per_member = factors.repeat_interleave(gy.shape[0] // len(factors)).view(-1, 1, 1, 1)
    x32, gy32 = x.float(), gy.float()
    if x.numel() <= gy.numel():
        x32 = x32 * per_member
    else:
        gy32 = gy32 * per_member
    padded, padding = conv_input(conv, x32, same_pad)
    if windows_disjoint(conv, padding):
        if conv.kernel_size == (1, 1):  # the strided pixels, a view (`conv_columns`)
            return torch.einsum("vol,vil->oi", gy32.flatten(2), conv_columns(conv, padded, padding))
        rows = window_rows(conv, padded)  # (C_out, members·L) @ (members·L, C_in·kh·kw)
        return gy32.flatten(2).transpose(0, 1).reshape(gy.shape[1], -1) @ rows.reshape(-1, rows.shape[-1])
    return torch.nn.grad.conv2d_weight(padded, conv.weight.shape, gy32, conv.stride, padding, conv.dilation)
