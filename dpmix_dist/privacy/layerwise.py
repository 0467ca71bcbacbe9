"""Per-group clipped gradient sums from one forward and one backward, layer by layer (ghost norm + book-keeping).

For each trainable layer the forward keeps its input A and the backward gives the gradient B of the loss with
respect to its output; no parameter gradient is formed by autograd. A group's gradient for a Linear layer is
Σ_t B_t A_tᵀ over the group's tokens t (its K views' tokens joined), so per layer we either

- form it (*direct*: b × d_out × d_in numbers), or
- get only its squared norm, Σ_{s,t} (A_s·A_t)(B_s·B_t) (*ghost norm*: b × (K·T)² numbers),

whichever costs fewer multiply-adds, then sum the norms over layers (flat clipping), take the clip factors
c_i = min(1, C/‖g_i‖), and form the clipped sum Σ_i c_i g_i directly from the kept A and B (*book-keeping*: no
second backward). Conv2d is a Linear over unfolded patches; LayerNorm / GroupNorm / LayerScale, an
Embedding lookup, a ViT's cls/reg tokens and position embedding and a ConvNeXt block's gamma have closed
forms. Layers of any other kind with trainable parameters are refused (`UnsupportedLayer`): the caller then
uses the generic engine in `clipping.py`.

Imports torch only. Exactness is tested against the naive per-group loop for every trainable parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dpmix_dist.privacy.clipping import clip_factors


class UnsupportedLayer(TypeError):
    """A module owns trainable parameters this engine has no closed form for."""


# timm modules recognised by class name, so this module needs no timm import: y = x * gamma.
_LAYER_SCALES = ("LayerScale", "LayerScale2d")


def _pad_same(x: torch.Tensor, kernel: tuple, stride: tuple, dilation: tuple) -> torch.Tensor:
    """TensorFlow 'same' padding (timm's Conv2dSame pads in forward, the extra pixel right/bottom)."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel, stride, dilation):
        total = max((-(size // -s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom))


@dataclass
class _Captured:
    module: nn.Module  # the module whose input/output-gradient is captured
    names: dict[str, str]  # attribute ("weight", "bias", "gamma", "pos_embed"...) -> full parameter name
    vit: nn.Module | None = None  # set for a ViT's cls_token / reg_token / pos_embed (captured at pos_drop)
    convnext: nn.Module | None = None  # set for a ConvNeXt block's raw gamma (y at mlp, ∂L/∂(γ·y) at drop_path)
    inputs: torch.Tensor | None = None
    output: torch.Tensor | None = None  # kept during one forward/backward only
    grad_out: torch.Tensor | None = None
    per_group: dict[str, torch.Tensor] = field(default_factory=dict)  # direct per-group gradients
    ghost: bool = False


def _tokens(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(b·K, ..., d) -> (b, K·T, d): the group's views' tokens joined on one axis."""
    return x.reshape(num_groups, -1, x.shape[-1])


class LayerwiseClipper:
    """Clipped per-group gradient sums for the trainable parameters of `module`.

    Args:
        module: maps a batch of inputs (n, ...) to logits (n, classes); all its trainable parameters must sit in
            Linear, Conv2d, LayerNorm, GroupNorm or timm LayerScale modules.
        params: name -> trainable parameter (names as in `module.named_parameters()`).
    """

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter]) -> None:
        self.module = module
        self.params = params
        by_id = {id(p): name for name, p in params.items()}
        self._layers: list[_Captured] = []
        covered: set[str] = set()
        for sub in module.modules():
            own = {attr: by_id[id(p)] for attr, p in sub.named_parameters(recurse=False) if id(p) in by_id}
            if not own:
                continue
            if type(sub).__name__ == "VisionTransformer" and set(own) <= {"cls_token", "reg_token", "pos_embed"}:
                # z = cat(cls, reg, patches) + pos_embed feeds pos_drop: ∂L/∂z gives all three per example.
                self._layers.append(_Captured(sub.pos_drop, own, vit=sub))
                covered |= set(own.values())
                continue
            if type(sub).__name__ == "ConvNeXtBlock" and set(own) == {"gamma"}:
                # out = drop_path(γ · y) + shortcut, y = the mlp's output: ∂L/∂γ_c = Σ_hw y_c · ∂L/∂(γy)_c
                self._layers.append(_Captured(sub.drop_path, own, convnext=sub))
                covered |= set(own.values())
                continue
            if isinstance(sub, nn.Embedding) and (sub.max_norm is not None or sub.scale_grad_by_freq or sub.sparse):
                raise UnsupportedLayer(f"Embedding with max_norm / scale_grad_by_freq / sparse ({', '.join(own.values())})")
            supported = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.Embedding)
            if not (isinstance(sub, supported) or type(sub).__name__ in _LAYER_SCALES and set(own) == {"gamma"}):
                raise UnsupportedLayer(f"{type(sub).__name__} owns trainable {', '.join(own.values())}")
            if isinstance(sub, nn.Conv2d) and (sub.padding_mode != "zeros" or isinstance(sub.padding, str)):
                raise UnsupportedLayer(f"Conv2d with padding {sub.padding!r}/{sub.padding_mode} ({', '.join(own.values())})")
            self._layers.append(_Captured(sub, own))
            covered |= set(own.values())
        missing = set(params) - covered
        if missing:
            raise UnsupportedLayer(f"parameters outside supported layers: {', '.join(sorted(missing))}")

    # ---------------------------------------------------------------------------------------- capture

    def _forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        num_groups, num_views = inputs.shape[:2]
        handles = []
        for layer in self._layers:  # a previous call that raised may have left captures behind
            layer.inputs = layer.output = layer.grad_out = None
            layer.per_group = {}

        def forward_hook(layer: _Captured) -> Callable:
            def hook(mod, args, output):
                if layer.inputs is not None:
                    raise UnsupportedLayer(f"{type(mod).__name__} runs twice in one forward (shared weights)")
                layer.inputs, layer.output = args[0].detach(), output

            return hook

        def mlp_hook(layer: _Captured) -> Callable:
            def hook(mod, args, output):
                layer.inputs = output.detach()

            return hook

        def output_hook(layer: _Captured) -> Callable:
            def hook(mod, args, output):
                layer.output = output

            return hook

        for layer in self._layers:
            if layer.convnext is not None:
                handles.append(layer.convnext.mlp.register_forward_hook(mlp_hook(layer)))
                handles.append(layer.module.register_forward_hook(output_hook(layer)))
            else:
                handles.append(layer.module.register_forward_hook(forward_hook(layer)))
        try:
            logits = self.module(inputs.flatten(0, 1))
        finally:
            for h in handles:
                h.remove()
        # class ids (b, K) or soft labels (b, K, classes): one loss per member, then the group's mean
        per_view = F.cross_entropy(logits.float(), targets.flatten(0, 1), reduction="none")
        losses = per_view.view(num_groups, num_views).mean(1)
        # Gradients with respect to the layers' outputs only: autograd forms no parameter gradient and does
        # not propagate below the first trainable layer.
        outputs = [layer.output for layer in self._layers]
        grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        for layer, grad in zip(self._layers, grads):
            layer.output, layer.grad_out = None, None if grad is None else grad.detach()
        return losses.detach()

    # ---------------------------------------------------------------------------------------- per layer

    def _linear_like(self, layer: _Captured, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a (n, T, d_in), b (n, T, d_out) per group: squared norms (n,), keeping what the clipped sum needs.

        a and b stay in their own dtype (bf16 under autocast) while stored for the clipped sum; every product is
        formed in fp32 from per-layer temporaries, so stored activations cost what autograd's own would.
        """
        n, t, d_in = a.shape
        d_out = b.shape[-1]
        sq = torch.zeros(n, device=a.device, dtype=torch.float32)
        has_weight = "weight" in layer.names
        layer.ghost = has_weight and t * t * (d_in + d_out) < t * d_in * d_out
        a32, b32 = a.float(), b.float()  # no copy in fp32
        if has_weight:
            if layer.ghost:
                aa = torch.bmm(a32, a32.transpose(1, 2))
                bb = torch.bmm(b32, b32.transpose(1, 2))
                sq += (aa * bb).sum((1, 2))
            else:
                g = torch.bmm(b32.transpose(1, 2), a32)  # (n, d_out, d_in)
                layer.per_group["weight"] = g
                sq += g.pow(2).sum((1, 2))
        if "bias" in layer.names:
            gb = b32.sum(1)
            layer.per_group["bias"] = gb
            sq += gb.pow(2).sum(1)
        # book-keeping needs A and B only where the weight's clipped sum is formed from them (ghost)
        layer.inputs, layer.grad_out = (a, b) if layer.ghost else (None, None)
        return sq

    def _norms_sq(self, layer: _Captured, num_groups: int) -> torch.Tensor:
        mod = layer.module
        if isinstance(mod, nn.Linear):  # upcasts per product, keeps bf16 A and B (see _linear_like)
            return self._linear_like(layer, _tokens(layer.inputs, num_groups), _tokens(layer.grad_out, num_groups))
        if isinstance(mod, nn.Conv2d):
            return self._conv(layer, num_groups)
        if isinstance(mod, nn.Embedding):
            return self._embedding(layer, num_groups)
        x = layer.inputs
        if x is not None and x.is_floating_point():
            x = x.float()  # bf16 activations: fp32 per-example math (temporaries; nothing of them is kept)
        gy = layer.grad_out.float()
        if layer.vit is not None:
            return self._elementwise(layer, self._vit_embedding_grads(layer.vit, gy, num_groups))
        if layer.convnext is not None:
            y = x if layer.convnext.use_conv_mlp else x.permute(0, 3, 1, 2)  # the mlp ran channels-last
            prod = (y * gy).reshape(num_groups, -1, gy.shape[1], gy[0, 0].numel()).sum((1, 3))
            return self._elementwise(layer, {"gamma": prod})
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
            if isinstance(mod, nn.LayerNorm):
                if type(mod).__name__ == "LayerNorm2d":  # timm: normalizes the channel axis of (n, C, H, W)
                    x, gy = x.permute(0, 2, 3, 1), gy.permute(0, 2, 3, 1)
                xhat = F.layer_norm(x, mod.normalized_shape, eps=mod.eps)
                xhat, gy = xhat.reshape(num_groups, -1, xhat.shape[-1]), gy.reshape(num_groups, -1, gy.shape[-1])
            else:
                xhat = F.group_norm(x, mod.num_groups, eps=mod.eps)  # (n·K, C, H, W) -> channels on axis 1
                c = xhat.shape[1]
                xhat = xhat.reshape(num_groups, -1, c, xhat[0, 0].numel()).transpose(2, 3).reshape(num_groups, -1, c)
                gy = gy.reshape(num_groups, -1, c, gy[0, 0].numel()).transpose(2, 3).reshape(num_groups, -1, c)
            return self._elementwise(layer, {"weight": (xhat * gy).sum(1), "bias": gy.sum(1)})
        # LayerScale: out = x * gamma, gamma over the channel axis (last for LayerScale, 1 for LayerScale2d)
        if type(mod).__name__ == "LayerScale2d":
            prod = (x * gy).reshape(num_groups, -1, x.shape[1], x[0, 0].numel()).sum((1, 3))
        else:
            prod = (x * gy).reshape(num_groups, -1, x.shape[-1]).sum(1)
        return self._elementwise(layer, {"gamma": prod})

    @staticmethod
    def _vit_embedding_grads(vit: nn.Module, gz: torch.Tensor, num_groups: int) -> dict[str, torch.Tensor]:
        """Per-group gradients of cls_token / reg_token / pos_embed from ∂L/∂z, z = the embedded sequence."""
        g = gz.reshape(num_groups, -1, *gz.shape[1:]).sum(1)  # (n, T, D): the group's views summed
        num_cls = 1 if vit.cls_token is not None else 0
        num_reg = vit.reg_token.shape[1] if vit.reg_token is not None else 0
        expected = (vit.pos_embed.shape[1] + (vit.num_prefix_tokens if vit.no_embed_class else 0)
                    if vit.pos_embed is not None else g.shape[1])
        if g.shape[1] != expected:  # dynamic_img_size resampled pos_embed: ∂z/∂pos_embed is no longer the identity
            raise UnsupportedLayer(f"ViT input of {g.shape[1]} tokens, pos_embed made for {expected}: use the built size")
        grads = {}
        if num_cls:
            grads["cls_token"] = g[:, :1]
        if num_reg:
            grads["reg_token"] = g[:, num_cls : num_cls + num_reg]
        if vit.pos_embed is not None:
            grads["pos_embed"] = g[:, vit.num_prefix_tokens :] if vit.no_embed_class else g
        return grads

    def _embedding(self, layer: _Captured, num_groups: int) -> torch.Tensor:
        """Ghost norm of an embedding lookup: ‖G_i‖² = Σ_{s,t} [id_s = id_t] (B_s·B_t) over the group's tokens."""
        mod = layer.module
        ids = layer.inputs.reshape(num_groups, -1).long()
        b = layer.grad_out.float().reshape(num_groups, ids.shape[1], mod.embedding_dim)
        if mod.padding_idx is not None:  # the padding row receives no gradient
            b = b * (ids != mod.padding_idx).unsqueeze(-1)
        same = ids.unsqueeze(2) == ids.unsqueeze(1)
        layer.ghost = True
        layer.inputs, layer.grad_out = ids, b
        return (torch.bmm(b, b.transpose(1, 2)) * same).sum((1, 2))

    def _elementwise(self, layer: _Captured, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        sq = 0
        for attr in layer.names:
            layer.per_group[attr] = grads[attr]
            sq = sq + grads[attr].float().pow(2).flatten(1).sum(1)
        layer.inputs = layer.grad_out = None
        return sq

    def _conv(self, layer: _Captured, num_groups: int) -> torch.Tensor:
        mod, x, gy = layer.module, layer.inputs, layer.grad_out
        if type(mod).__name__ == "Conv2dSame":  # timm's TF-style 'same' conv pads inside forward, asymmetrically
            x = _pad_same(x, mod.kernel_size, mod.stride, mod.dilation)
        cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
        n_views, _, length = cols.shape
        gy = gy.reshape(n_views, mod.out_channels, -1)  # (n·K, C_out, L)
        if mod.groups == 1:
            a = cols.transpose(1, 2).reshape(num_groups, -1, cols.shape[1])  # (n, K·L, C_in·k·k)
            b = gy.transpose(1, 2).reshape(num_groups, -1, mod.out_channels)
            return self._linear_like(layer, a, b)
        # Grouped (e.g. depthwise) conv: per-group gradients are small, form them directly.
        g = mod.groups
        a = cols.float().reshape(n_views, g, -1, length)  # (nK, g, C_in/g·k·k, L)
        b = gy.float().reshape(n_views, g, -1, length)  # (nK, g, C_out/g, L)
        w = torch.einsum("vgol,vgil->vgoi", b, a).reshape(num_groups, -1, *mod.weight.shape).sum(1)
        grads = {"weight": w}
        if "bias" in layer.names:
            grads["bias"] = gy.float().sum(2).reshape(num_groups, -1, mod.out_channels).sum(1)
        return self._elementwise(layer, grads)

    # ---------------------------------------------------------------------------------------- clipped sum

    def _clipped(self, layer: _Captured, factors: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for attr, name in layer.names.items():
            shape = self.params[name].shape
            if attr == "weight" and layer.ghost and isinstance(layer.module, nn.Embedding):
                ids, b = layer.inputs, layer.grad_out  # (n, T), (n, T, D)
                scaled = (b * factors.view(-1, 1, 1)).reshape(-1, b.shape[-1])
                out[name] = torch.zeros(shape, device=b.device).index_add_(0, ids.reshape(-1), scaled)
            elif attr == "weight" and layer.ghost:
                a, b = layer.inputs, layer.grad_out  # (n, T, d_in), (n, T, d_out)
                scaled = b.float() * factors.view(-1, 1, 1)  # factors stay fp32 whatever b's dtype
                g = torch.einsum("nto,nti->oi", scaled, a.float())
                out[name] = g.reshape(shape)
            else:
                g = layer.per_group[attr]
                out[name] = torch.einsum("n,n...->...", factors, g.float()).reshape(shape)
        layer.inputs = layer.grad_out = None
        layer.per_group = {}
        return out

    def clipped_sum(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        max_grad_norm: float,
        autocast_dtype: torch.dtype | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Σ_i clip_C(∇ mean loss of group i), in fp32, and the (b,) group losses.

        Args:
            inputs: (b, K, ...) — b groups of K members.
            targets: (b, K) class ids or (b, K, classes) soft labels.
            max_grad_norm: C.
            autocast_dtype: run the forward and backward under autocast (e.g. torch.bfloat16); norms, clip
                factors and the clipped sum are still computed in fp32.
        """
        num_groups = inputs.shape[0]
        with torch.autocast(inputs.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            losses = self._forward_backward(inputs, targets)
        norms_sq = torch.zeros(num_groups, device=inputs.device, dtype=torch.float32)
        for layer in self._layers:
            if layer.grad_out is None:
                raise RuntimeError(f"{type(layer.module).__name__} got no gradient: is it used in the forward?")
            norms_sq += self._norms_sq(layer, num_groups)
        factors = clip_factors(norms_sq.sqrt(), max_grad_norm)
        summed: dict[str, torch.Tensor] = {}
        for layer in self._layers:
            summed.update(self._clipped(layer, factors))
        return {name: summed[name] for name in self.params}, losses

