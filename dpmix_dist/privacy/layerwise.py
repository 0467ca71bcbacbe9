"""Per-group clipped gradient sums from one forward and one backward, layer by layer (ghost norm + book-keeping):
the engine. It owns the hooks, the book-keeping and the choice of path per layer; the closed forms it applies, per
layer type, are in `layer_grads.py`.

For each trainable layer the forward keeps its input A and the backward gives the gradient B of the loss with
respect to its output; no parameter gradient is formed by autograd. A group's gradient for a Linear layer is
Σ_t B_t A_tᵀ over the group's t tokens (its G members' tokens joined), so per layer we either

- form it (*direct*: b × d_out × d_in numbers, no more multiply-adds than the weight gradient itself), or
- get only its squared norm, Σ_{s,t} (A_s·A_t)(B_s·B_t) (*ghost norm*: t²·(d_in + d_out) more multiply-adds), and
  keep A and B (b × t × (d_in + d_out) numbers) to form the clipped sum Σ_i c_i g_i from them once the clip factors
  c_i = min(1, C/‖g_i‖) are known (*book-keeping*: one weight gradient, no second backward),

direct unless its per-group gradient would be more than 1.25× what ghost keeps (`_direct`). Each layer's work is
done by a hook on its output as soon as autograd has B, in the backward: the direct layers' A and B are then let go
at once, as non-private training lets go of them, so at most the ghost layers' A and B outlive the backward.
Convolutions are Linear layers over unfolded patches, but the patches are unfolded only where cheaper: a convolution
whose windows are disjoint (1×1, a ViT's patch embedding) reads them through a strided view and forms its clipped sum
by one matmul over them, a large map's per-group gradients come from the convolution's own weight-gradient kernel (one
call per group), and another ghost convolution's clipped sum is that kernel on the kept input, scaled.

Exact or refused. A layer is accepted only if its EXACT class is in `_RULES`, a registry of classes whose forward
has been read and is the closed form its rule computes: Linear; Conv2d (a Linear over unfolded patches, its padding
replayed: 'same', reflect..., timm's Conv2dSame); LayerNorm / GroupNorm, and timm's norm + activation layers with B
taken before the activation; LayerScale; an Embedding lookup; a ViT's cls/reg tokens and position embedding; a
ConvNeXt block's gamma. A subclass is not its base class (timm's StdConv2d standardises its weight in forward), so
any other module owning a trainable parameter is refused by the constructor (`UnsupportedLayer`), never
approximated: `performance.engine=auto` then uses the generic engine in `clipping.py`. What only a forward can show
(a layer run twice or bypassed, a tensor it read overwritten in place) is refused at the first call, or by the
constructor when it is given an `example` input.

Imports torch only. Exactness is tested against the naive per-group loop for every trainable parameter, for every
registered class and across timm's model zoo (tests/test_layerwise.py, tests/test_zoo.py).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from dpmix_dist.privacy import layer_grads as lg
from dpmix_dist.privacy.clipping import clip_factors

_FIX = "performance.engine=auto falls back to the generic engine (performance.engine=functorch)"
_FIX_RUN = "use performance.engine=functorch (engine=auto falls back only on a refusal by the constructor)"


class UnsupportedLayer(TypeError):
    """A module owns trainable parameters this engine has no exact rule for. `layers`: the offending class names."""

    def __init__(self, message: str, layers: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.layers = layers


@dataclass(frozen=True)
class _Rule:
    """How one layer class's per-group gradient is read from what its forward saw.

    kind: the closed form (see `_norms_sq`).
    channels_first: layer_norm / scale act on axis 1 of (n, C, H, W) rather than on the last axis.
    grad_at_drop: a norm + activation module, y = act(drop(norm(x))): B is ∂L/∂norm(x), taken at the input of its
        `drop` child, before the activation.
    same_pad: TF 'same' padding applied inside forward, replayed before unfolding.
    """

    kind: str
    channels_first: bool = False
    grad_at_drop: bool = False
    same_pad: bool = False


_LINEAR, _CONV, _EMBEDDING = _Rule("linear"), _Rule("conv"), _Rule("embedding")
_LN, _LN2D, _GN = _Rule("layer_norm"), _Rule("layer_norm", channels_first=True), _Rule("group_norm")

# EXACT class (module path + name, so that this module needs no timm import) -> rule. The timm entries were read in
# timm 1.0.31; the comment says what each forward does. A class missing here is refused, whatever its base class.
_RULES: dict[str, _Rule] = {
    "torch.nn.modules.linear.Linear": _LINEAR,
    "torch.nn.modules.conv.Conv2d": _CONV,
    "torch.nn.modules.normalization.LayerNorm": _LN,
    "torch.nn.modules.normalization.GroupNorm": _GN,
    "torch.nn.modules.sparse.Embedding": _EMBEDDING,
    "timm.layers.linear.Linear": _LINEAR,  # F.linear(x, weight, bias) (casts to x's dtype under torchscript only)
    "timm.layers.conv2d_same.Conv2dSame": _Rule("conv", same_pad=True),  # pad_same(x), then F.conv2d, padding 0
    # F.layer_norm / F.group_norm of the input with the module's weight, bias, eps. timm's fast_norm (off by default)
    # is the same function run in the autocast dtype; the *Fp32 classes run it in fp32 and cast back.
    "timm.layers.norm.LayerNorm": _LN,
    "timm.layers.norm.LayerNormFp32": _LN,
    "timm.layers.norm.LayerNorm2d": _LN2D,  # (n, C, H, W): permute to NHWC, F.layer_norm over C, permute back
    "timm.layers.norm.LayerNorm2dFp32": _LN2D,
    "timm.layers.norm.GroupNorm": _GN,
    "timm.layers.norm.GroupNorm1": _GN,  # one group
    "timm.models.metaformer.LayerNormNoBias": _LN,  # the parent class's forward with bias = None
    "timm.models.metaformer.LayerNorm2dNoBias": _LN2D,
    "timm.models.metaformer.GroupNorm1NoBias": _GN,
    # norm as above (LayerNormAct2d permutes back to NCHW first), then x = self.drop(x); x = self.act(x)
    "timm.layers.norm_act.LayerNormAct": _Rule("layer_norm", grad_at_drop=True),
    "timm.layers.norm_act.LayerNormActFp32": _Rule("layer_norm", grad_at_drop=True),
    "timm.layers.norm_act.LayerNormAct2d": _Rule("layer_norm", channels_first=True, grad_at_drop=True),
    "timm.layers.norm_act.LayerNormAct2dFp32": _Rule("layer_norm", channels_first=True, grad_at_drop=True),
    "timm.layers.norm_act.GroupNormAct": _Rule("group_norm", grad_at_drop=True),
    "timm.layers.norm_act.GroupNorm1Act": _Rule("group_norm", grad_at_drop=True),
    # x * gamma over the last axis / over axis 1; MetaFormer's Scale is x * scale.view(shape), shape (C,) or (C, 1, 1)
    "timm.layers.layer_scale.LayerScale": _Rule("scale"),
    "timm.layers.layer_scale.LayerScale2d": _Rule("scale", channels_first=True),
    "timm.models.metaformer.Scale": _Rule("scale"),
    # _pos_embed: z = cat(cls, reg, patches) + pos_embed (no_embed_class: cat(cls, reg, patches + pos_embed)) feeds
    # pos_drop, so ∂L/∂z gives all three per example
    "timm.models.vision_transformer.VisionTransformer": _Rule("vit_tokens"),
    # out = drop_path(y.mul(gamma)) + shortcut(x), y = the mlp's output: ∂L/∂γ_c = Σ_hw y_c · ∂L/∂(γy)_c
    "timm.models.convnext.ConvNeXtBlock": _Rule("convnext_gamma"),
}


def _class_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _instance_problem(sub: nn.Module, rule: _Rule, own: dict[str, str]) -> str | None:
    """Why this instance of a registered class is still outside its rule's closed form (None: it is not)."""
    if rule.kind == "embedding" and (sub.max_norm is not None or sub.scale_grad_by_freq or sub.sparse):
        return "max_norm / scale_grad_by_freq / sparse"
    if rule.kind == "layer_norm" and len(sub.normalized_shape) != 1:
        return f"normalized_shape {tuple(sub.normalized_shape)} (one axis only)"
    if rule.kind == "scale" and getattr(sub, "inplace", False):
        return "inplace=True overwrites its input (models.disable_inplace)"
    if rule.kind == "vit_tokens":
        if not set(own) <= {"cls_token", "reg_token", "pos_embed"}:
            return f"trainable {', '.join(sorted(own))}"
    if rule.kind == "convnext_gamma" and set(own) != {"gamma"}:
        return f"trainable {', '.join(sorted(own))}"
    return None


@dataclass
class _Captured:
    module: nn.Module  # the module that owns the parameters
    rule: _Rule
    names: dict[str, str]  # attribute ("weight", "bias", "gamma", "pos_embed"...) -> full parameter name
    channels_first: bool = False
    inputs: torch.Tensor | None = None  # A, detached: from the forward until B arrives (a ghost layer: to the sum)
    input_version: int = 0  # A's version counter when captured: an in-place write after it is detected
    edge: GradientEdge | None = None  # where B is read: a gradient edge, which later in-place ops do not move,
    out_view: torch.Tensor | None = None  # a view output that is not a reshape: held to the end of the forward
    out_version: int = 0
    out_meta: tuple | None = None  # B's (shape, dtype), for a layer whose output the loss ignores
    grad_out: torch.Tensor | None = None  # B, kept to the clipped sum by a ghost layer only
    norm_sq: torch.Tensor | None = None  # (b,) this layer's part of each group's squared norm, once B has arrived
    per_group: dict[str, torch.Tensor] = field(default_factory=dict)  # direct per-group gradients
    ghost: bool = False

    def taps(self) -> list[tuple[nn.Module, str, str]]:
        """(module, "input" | "output", "inputs" | "grad"): which module's input or output is A, and where B is."""
        mod, rule = self.module, self.rule
        if rule.kind == "vit_tokens":  # dynamic_img_size: A = the patch grid, to see whether pos_embed was resampled
            return [(mod.pos_drop, "output", "grad")] + [(mod.patch_embed, "output", "inputs")] * mod.dynamic_img_size
        if rule.kind == "convnext_gamma":  # A = y (the mlp's output), B at drop_path's output
            return [(mod.mlp, "output", "inputs"), (mod.drop_path, "output", "grad")]
        grad_at = (mod.drop, "input") if rule.grad_at_drop else (mod, "output")
        return [(mod, "input", "inputs"), (*grad_at, "grad")]


# A weight's per-group gradient is formed (direct) unless it is more than this many times the size of what the ghost
# norm keeps for the clipped sum instead (A and B: t·(d_in + d_out) per group for d_out·d_in weights). Then the ghost
# norm costs t²·(d_in + d_out) < t·d_in·d_out multiply-adds, less than one weight gradient; direct costs no more than
# the weight gradient that the ghost layer's clipped sum forms anyway. Above 1, direct trades a little memory for
# time where both are close (ResNet-50's 14×14 stage: 1.04-1.17; ViT-S/16 at 224 px: 1.46-1.56 stays ghost).
_DIRECT_OVER_GHOST_MEMORY = 1.25
# A direct 3×3 (non-1×1) convolution with at least this many output positions per member forms its per-group
# gradients with the convolution's own weight-gradient kernel, one call per group, rather than by unfolding patches
# (9× its input) into a batched matmul, which is faster only on small maps.
_CONV_LOOP_MIN_POSITIONS = 400


def _direct(t: int, d_in: int, d_out: int) -> bool:
    """Form this weight's per-group gradient (True) or take its ghost norm (False), t tokens per group."""
    return d_in * d_out <= _DIRECT_OVER_GHOST_MEMORY * t * (d_in + d_out)


def _is_reshape(view: torch.Tensor, base: torch.Tensor) -> bool:
    """`view` holds all of `base`'s elements in its order: the gradient of one is the other's, reshaped."""
    return (
        view.numel() == base.numel()
        and view.storage_offset() == base.storage_offset()
        and view.is_contiguous()
        and base.is_contiguous()
    )


def _sources(layers: list[_Captured]) -> list[_Captured]:
    """The layers whose gradient edge no other layer's lies above (nearer the input than it).

    Asking autograd for these edges alone runs every other layer's node, since each lies on a path from the loss to one
    of them, so every layer's hook sees its B; autograd keeps only the returned gradients (theirs) to the end.
    """
    targets = {layer.edge.node for layer in layers}
    known_clear: set = set()  # nodes whose whole upstream holds no layer's node

    def reaches_a_layer(node) -> bool:
        stack, seen = [nxt for nxt, _ in node.next_functions if nxt is not None], set()
        while stack:
            cur = stack.pop()
            if cur in targets:
                return True
            if cur in seen or cur in known_clear:
                continue
            seen.add(cur)
            stack.extend(nxt for nxt, _ in cur.next_functions if nxt is not None)
        known_clear.update(seen)
        return False

    return [layer for layer in layers if not reaches_a_layer(layer.edge.node)]


class LayerwiseClipper:
    """Clipped per-group gradient sums for the trainable parameters of `module`.

    Args:
        module: maps a batch of inputs (n, ...) to logits (n, classes); each module owning a trainable parameter must
            be of a class in `_RULES` (exactly: a subclass is refused).
        params: name -> trainable parameter (names as in `module.named_parameters()`).
        example: optional inputs (n, ...) of the kind `module` will see: one is run through `clipped_sum` here, so
            that what only a forward shows (a layer run twice or bypassed) is refused by the constructor too.

    Raises:
        UnsupportedLayer: some trainable parameter sits outside the registered closed forms.
    """

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter], example: torch.Tensor | None = None) -> None:
        self.module = module
        self.params = params
        self._num_groups = 0  # b, during one call
        by_id = {id(p): name for name, p in params.items()}
        # A module or parameter registered twice may run twice: this engine keeps one capture per layer.
        module_uses = Counter(id(m) for _, m in module.named_modules(remove_duplicate=False))
        param_uses = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
        self._layers: list[_Captured] = []
        problems: dict[str, list[str]] = {}
        covered: set[str] = set()
        for sub in module.modules():
            own = {attr: by_id[id(p)] for attr, p in sub.named_parameters(recurse=False) if id(p) in by_id}
            if not own:
                continue
            covered |= set(own.values())
            rule = _RULES.get(_class_name(sub))
            if rule is None:
                problem = "no exact rule for this class"
            elif module_uses[id(sub)] > 1 or any(param_uses[id(params[n])] > 1 for n in own.values()):
                problem = "shared (registered more than once)"
            else:
                problem = _instance_problem(sub, rule, own)
            if problem is not None:
                problems.setdefault(type(sub).__qualname__, []).append(f"{problem}: {', '.join(own.values())}")
                continue
            # MetaFormer's Scale is channels-first per instance: its shape is (C, 1, 1)
            channels_first = rule.channels_first or (rule.kind == "scale" and len(getattr(sub, "shape", ())) == 3)
            self._layers.append(_Captured(sub, rule, own, channels_first=channels_first))
        missing = sorted(set(params) - covered)
        if missing:
            problems["(not a parameter of module)"] = [", ".join(missing)]
        if problems:
            detail = "; ".join(
                f"{cls} ({what[0]}{f' and {len(what) - 1} more' if len(what) > 1 else ''})"
                for cls, what in problems.items()
            )
            raise UnsupportedLayer(f"the layer-wise engine refuses {detail}; {_FIX}", tuple(problems))
        if example is not None:
            zeros = torch.zeros(1, 1, dtype=torch.long, device=example.device)
            self.clipped_sum(example[:1].unsqueeze(1), zeros, 1.0)

    # ---------------------------------------------------------------------------------------- capture

    def _forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One forward and one backward; each layer's B is taken by a hook on its output as soon as autograd has it
        (`_receive`): its norm and direct per-group gradients are formed there, and B is dropped unless ghost."""
        num_groups, group_size = inputs.shape[:2]
        self._num_groups = num_groups
        handles = []
        for layer in self._layers:  # a previous call that raised may have left captures behind
            layer.inputs = layer.edge = layer.out_view = layer.out_meta = layer.grad_out = layer.norm_sq = None
            layer.per_group = {}

        def tap(layer: _Captured, which: str, slot: str) -> Callable:
            def hook(mod, args, output=None):
                value = args[0] if which == "input" else output
                if (layer.inputs if slot == "inputs" else layer.edge) is not None:
                    name = type(layer.module).__qualname__
                    raise UnsupportedLayer(f"{name} runs twice in one forward (shared weights); {_FIX_RUN}", (name,))
                if slot == "inputs":
                    layer.inputs, layer.input_version = value.detach(), value._version
                else:
                    layer.out_meta, target = (value.shape, value.dtype), value
                    if value._is_view():  # an in-place op on a view rebuilds its graph node, which then gets nothing
                        base = value._base
                        if _is_reshape(value, base):  # Linear on (n, T, d): read B at the base, a 2-D matmul's output
                            target = base
                        else:  # held to the end of the forward, so that such an op is seen there
                            layer.out_view, layer.out_version = value.detach(), value._version
                    layer.edge = get_gradient_edge(target)
                    # a hook registered now sees the gradient of this value, whatever in-place ops follow
                    target.register_hook(functools.partial(self._receive, layer))

            return hook

        for layer in self._layers:
            for mod, which, slot in layer.taps():
                # an input is read before the forward runs, so that the forward itself cannot overwrite it unseen
                register = mod.register_forward_pre_hook if which == "input" else mod.register_forward_hook
                handles.append(register(tap(layer, which, slot)))
        try:
            logits = self.module(inputs.flatten(0, 1))
        finally:
            for h in handles:
                h.remove()
        for layer in self._layers:
            name = type(layer.module).__qualname__
            if layer.edge is None or (layer.inputs is None and any(slot == "inputs" for *_, slot in layer.taps())):
                raise UnsupportedLayer(
                    f"{name} owns trainable parameters but its forward did not run (its "
                    f"parameters are used another way); {_FIX_RUN}",
                    (name,),
                )
            if layer.inputs is not None and layer.inputs._version != layer.input_version:
                raise UnsupportedLayer(
                    f"the input of {name} was overwritten in place after it was read "
                    f"(models.disable_inplace); {_FIX_RUN}",
                    (name,),
                )
            if layer.out_view is not None and layer.out_view._version != layer.out_version:
                raise UnsupportedLayer(
                    f"the output of {name} (a view) was overwritten in place (models.disable_inplace); {_FIX_RUN}",
                    (name,),
                )
            layer.out_view = None  # the backward writes no activation: holding this output would only keep it alive
            if layer.rule.kind == "vit_tokens":
                self._check_vit_grid(layer)
        # class ids (b, G) or soft labels (b, G, classes): one loss per member, then the group's mean
        per_member = F.cross_entropy(logits.float(), targets.flatten(0, 1), reduction="none")
        losses = per_member.view(num_groups, group_size).mean(1)
        # Gradients with respect to the layers' outputs only (gradient edges: in-place ops after a layer, such as
        # `x += shortcut`, do not change them): autograd forms no parameter gradient and stops at the first layer.
        # Asked for the first layers' edges only, it holds no other layer's B: the hooks take each as it comes.
        sources = _sources(self._layers)
        grads = torch.autograd.grad(losses.sum(), [layer.edge for layer in sources], allow_unused=True)
        for layer, grad in zip(sources, grads):
            if layer.norm_sq is None and grad is not None:
                self._receive(layer, grad)
        for layer in self._layers:
            if layer.norm_sq is None:  # the layer ran but the loss does not depend on its output: B = 0
                self._receive(layer, torch.zeros(layer.out_meta[0], dtype=layer.out_meta[1], device=inputs.device))
            layer.edge, layer.out_meta = None, None
        return losses.detach()

    def _receive(self, layer: _Captured, grad: torch.Tensor) -> None:
        """B has arrived: this layer's part of the squared norms, its direct per-group gradients; A and B dropped
        unless the layer is ghost. Called inside autograd's backward, whose autocast state it must not inherit."""
        if layer.norm_sq is not None:
            name = type(layer.module).__qualname__
            raise UnsupportedLayer(f"{name}: its output received two gradients; {_FIX_RUN}", (name,))
        gy = grad.detach().view(layer.out_meta[0])
        if torch.is_autocast_enabled(gy.device.type):  # entering the context costs more than a small layer's math
            with torch.autocast(gy.device.type, enabled=False):
                layer.norm_sq = self._norms_sq(layer, gy)
        else:
            layer.norm_sq = self._norms_sq(layer, gy)
        if not layer.ghost:
            layer.inputs = layer.grad_out = None

    # ---------------------------------------------------------------------------------------- per layer

    def _norms_sq(self, layer: _Captured, gy: torch.Tensor) -> torch.Tensor:
        """This layer's part of each group's squared norm from A (`layer.inputs`) and B (`gy`); fills
        `layer.per_group` (direct) or sets `layer.ghost` and keeps A and B in `layer.inputs` / `layer.grad_out`.

        A and B stay in their own dtype (bf16 under autocast) while kept for the clipped sum; every product is
        formed in fp32 from per-layer temporaries, so kept activations cost what autograd's own would.
        """
        mod, kind, num_groups = layer.module, layer.rule.kind, self._num_groups
        layer.ghost = False
        if kind == "linear":
            return self._linear(layer, lg.tokens(layer.inputs, num_groups), lg.tokens(gy, num_groups))
        if kind == "conv":
            return self._conv(layer, layer.inputs, gy)
        if kind == "embedding":
            layer.ghost = True
            layer.inputs, layer.grad_out, sq = lg.embedding_ghost(layer.inputs, gy, mod, num_groups)
            return sq
        if kind == "vit_tokens":
            return self._elementwise(layer, lg.vit_token_grads(mod, gy, num_groups))
        x = layer.inputs
        if x is not None and x.is_floating_point():
            x = x.float()  # bf16 activations: fp32 per-example math (temporaries; nothing of them is kept)
        gy = gy.float()
        if kind == "convnext_gamma":
            y = x if mod.use_conv_mlp else x.permute(0, 3, 1, 2)  # the mlp ran channels-last
            return self._elementwise(layer, {"gamma": lg.convnext_gamma_grads(y, gy, num_groups)})
        if kind == "layer_norm":
            return self._elementwise(layer, lg.layer_norm_grads(x, gy, mod, num_groups, layer.channels_first))
        if kind == "group_norm":
            return self._elementwise(layer, lg.group_norm_grads(x, gy, mod, num_groups))
        (attr,) = layer.names  # scale
        return self._elementwise(layer, {attr: lg.scale_grads(x, gy, num_groups, layer.channels_first)})

    def _linear(self, layer: _Captured, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a (n, t, d_in), b (n, t, d_out) per group."""
        n, t, d_in = a.shape
        a32, b32 = a.float(), b.float()  # no copy in fp32
        names = layer.names
        if "weight" in names and not _direct(t, d_in, b.shape[-1]):
            layer.ghost = True
            layer.inputs, layer.grad_out = a, b  # the clipped sum is formed from them (book-keeping)
            return lg.linear_ghost_norm_sq(a32, b32, "bias" in names)
        sq = torch.zeros(n, device=a.device, dtype=torch.float32)
        if "weight" in names:
            layer.per_group["weight"] = g = lg.linear_per_group(a32, b32)
            sq += lg.sq_norms(g)
        if "bias" in names:
            layer.per_group["bias"] = gb = b32.sum(1)
            sq += lg.sq_norms(gb)
        return sq

    @staticmethod
    def _check_vit_grid(layer: _Captured) -> None:
        """pos_embed enters z as is only when the patch grid is the one it was made for."""
        vit = layer.module
        grid = None if layer.inputs is None else tuple(layer.inputs.shape[1:3])  # dynamic_img_size: (n, H, W, D)
        if "pos_embed" in layer.names and grid not in (None, tuple(vit.patch_embed.grid_size)):
            # resample_abs_pos_embed interpolated pos_embed: ∂z/∂pos_embed is no longer the identity
            built = tuple(vit.patch_embed.grid_size)
            raise UnsupportedLayer(
                f"ViT input of {grid} patches, pos_embed made for {built}: build the model for the "
                f"input size (img_size); {_FIX_RUN}",
                ("VisionTransformer",),
            )

    def _elementwise(self, layer: _Captured, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        sq = 0
        for attr in layer.names:
            layer.per_group[attr] = grads[attr]
            sq = sq + lg.sq_norms(grads[attr])
        return sq

    def _conv(self, layer: _Captured, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
        """A Linear over unfolded patches, t = G·L positions per group, d_in = C_in·k·k: the path by shape."""
        mod, num_groups = layer.module, self._num_groups
        members, c_out, length = gy.shape[0], gy.shape[1], gy[0, 0].numel()
        kh, kw = mod.kernel_size
        padded, padding = lg.conv_input(mod, x, layer.rule.same_pad)
        gy32 = gy.float()
        grads: dict[str, torch.Tensor] = {}
        if "bias" in layer.names:
            grads["bias"] = lg.conv_bias_grads(gy32, num_groups)
        if mod.groups == mod.in_channels == mod.out_channels:  # depthwise: per kernel offset, never unfolded
            per_member = lg.depthwise_per_member(mod, padded.float(), padding, gy32)
            w = per_member.reshape(num_groups, -1, *mod.weight.shape).sum(1)
            return self._elementwise(layer, {"weight": w, **grads})
        if mod.groups > 1:  # grouped: per-group gradients are small, form them directly
            w = lg.grouped_conv_per_group(mod, padded, padding, gy32, num_groups)
            return self._elementwise(layer, {"weight": w, **grads})
        direct = _direct(members // num_groups * length, mod.in_channels * kh * kw, c_out)
        if direct and not lg.windows_disjoint(mod, padding) and length >= _CONV_LOOP_MIN_POSITIONS:
            w = lg.conv_per_group_by_kernel(mod, padded, padding, gy32, num_groups)
            return self._elementwise(layer, {"weight": w, **grads})
        cols = lg.conv_columns(mod, padded, padding)
        if direct:
            w = lg.conv_per_group_from_columns(cols, gy32, num_groups, mod.weight.shape)
            return self._elementwise(layer, {"weight": w, **grads})
        layer.ghost = True
        sq = lg.conv_ghost_norm_sq(cols, gy32, num_groups)
        for attr, g in grads.items():
            layer.per_group[attr] = g
            sq += lg.sq_norms(g)
        layer.inputs, layer.grad_out = x, gy  # as the forward saw them: the clipped sum is a weight gradient of them
        return sq

    # ---------------------------------------------------------------------------------------- clipped sum

    def _clipped(self, layer: _Captured, factors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ_i c_i g_i of each of this layer's parameters; lets go of what the layer kept."""
        kind, names = layer.rule.kind, layer.names
        out = {}
        if layer.ghost and kind == "linear":
            weight, bias = lg.linear_clipped_sum(layer.inputs, layer.grad_out, factors, "bias" in names)
            out = {names["weight"]: weight, **({names["bias"]: bias} if bias is not None else {})}
        elif layer.ghost and kind == "embedding":
            out = {
                names["weight"]: lg.embedding_clipped_sum(
                    layer.inputs, layer.grad_out, factors, layer.module.weight.shape
                )
            }
        elif layer.ghost:  # conv: the weight from the kept input and B, the bias per group
            out = {
                names["weight"]: lg.conv_clipped_sum(
                    layer.module, layer.inputs, layer.grad_out, factors, layer.rule.same_pad
                )
            }
        for attr, name in names.items():
            if name not in out:
                out[name] = lg.weighted_sum(factors, layer.per_group[attr])
        layer.inputs = layer.grad_out = None
        layer.per_group = {}
        return {name: out[name].reshape(self.params[name].shape) for name in names.values()}

    def clipped_sum(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        max_grad_norm: float,
        autocast_dtype: torch.dtype | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Σ_i clip_C(∇ mean loss of group i), in fp32, and the (b,) group losses.

        Args:
            inputs: (b, G, ...) — b groups of G members.
            targets: (b, G) class ids or (b, G, classes) soft labels.
            max_grad_norm: C.
            autocast_dtype: run the forward and backward under autocast (e.g. torch.bfloat16); norms, clip
                factors and the clipped sum are still computed in fp32.
        """
        num_groups = inputs.shape[0]
        with torch.autocast(
            inputs.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            losses = self._forward_backward(inputs, targets)
        norms_sq = torch.zeros(num_groups, device=inputs.device, dtype=torch.float32)
        for layer in self._layers:
            norms_sq += layer.norm_sq
            layer.norm_sq = None
        factors = clip_factors(norms_sq.sqrt(), max_grad_norm)
        summed: dict[str, torch.Tensor] = {}
        for layer in self._layers:
            summed.update(self._clipped(layer, factors))
        return {name: summed[name] for name in self.params}, losses
