"""Discrimination-aware channel pruning (DCP) as plain functions on tensors and modules.

Zhuang, Tan, Zhuang, Liu, Guo, Wu, Huang and Zhu, "Discrimination-aware Channel Pruning for Deep
Neural Networks", NeurIPS 2018 (arXiv 1810.11809).

The method
----------
The network is split into P+1 stages. An auxiliary classifier (:class:`AuxHead`) sits after each of
the first P stages and gives a discrimination-aware loss ``L_S^p`` (cross-entropy of that head);
:func:`attach_aux_heads` builds the heads and :func:`forward_with_aux` returns the final logits and
every head's logits in one forward pass (forward hooks on the stage modules; the model's class, its
``state_dict`` and its hooks are left as they were). Stage by stage the network is first fine-tuned
with ``L_S^p + L_f`` (the caller's training loop: the sum of cross-entropies of the stage's head
and of the final classifier), then every layer of the stage is pruned in turn. For one convolution
with input ``X`` in the *pruned* network and output ``F`` in the *baseline* network the joint loss is

    L(W) = L_M(W) + alpha * L_S^p(W),    L_M(W) = 1/(2Q) ||F - X * W||^2          (reconstruction_loss)

and the input channels (the previous layer's output channels) are chosen greedily
(:func:`select_channels`, the paper's Algorithm 2): start from the empty set ``A``; with the
weights of the channels outside ``A`` set to zero, score every channel by
``S_k = ||dL/dW_k||_F^2``, the sum of the squared gradients of the joint loss over the weights that
read input channel ``k`` (:func:`channel_scores`; non-negative by construction); add the channel
with the largest score to ``A``; re-optimize the weights of the channels in ``A`` by gradient steps
on ``L``; repeat until ``K`` channels are selected. LCP (Xie et al.) reuses all of this with a
detection auxiliary loss: ``aux_loss`` is any callable of the layer's output.

:func:`layer_io` captures a layer's input and output for a batch (``X`` from the pruned network,
``F`` from the baseline); :func:`stage_aux_loss` turns a stage head into the callable ``aux_loss``
that :func:`select_channels` takes: it runs the stage on its captured input with the layer's output
replaced.

Choices where the paper is silent, or where this implementation departs from it
------------------------------------------------------------------------------
* ``Q`` is the batch size: ``L_M = sum((F - F')^2) / (2 * batch)``, summed over channels and
  positions. The constant only rescales the balance against ``alpha`` (the step size below is derived
  from the loss, so it does not depend on it).
* ``alpha = 1.0`` by default. With this ``Q``, ``L_M`` of a CIFAR ResNet layer is in the hundreds or
  thousands while a cross-entropy ``L_S`` is about 2, so at ``alpha = 1`` the reconstruction decides
  the selection; ``alpha`` of the order of ``L_M / L_S`` at the start gives the head a real say.
* A channel entering ``A`` starts from its baseline weights (not from zero); channels outside ``A``
  are never updated and are dropped from the returned weight.
* Re-optimization after each addition: ``steps = 10`` plain gradient steps (no momentum, no weight
  decay) on the full batch given. The step size is ``1 / lambda_max`` of the reconstruction loss's
  Hessian over all input channels (20 power iterations; a bound for every subset), unless ``lr`` is
  given. A step that raises the joint loss is undone and the step size halved for the rest of that
  addition, so the loss never increases.
* The bias of the layer, if any, is kept and not optimized.
* One batch ``(X, F)`` is used for the scores and every step, rather than the training set in
  mini-batches: pass a batch large enough to stand for the data.
* ``keep`` equal to the number of input channels selects all of them without a greedy pass and
  re-optimizes from the baseline weights: a no-op when ``F`` is the layer's own output on ``X`` and
  there is no auxiliary loss.
* :func:`layer_io` and :func:`stage_aux_loss` run the model in eval mode (BatchNorm running
  statistics), so selection changes no running statistic and the two see the same activations.
* The head: descriptions of the method give BN - ReLU - average pooling - linear (softmax in the
  loss), or a conv-BN-ReLU block before the pooling. Both are here: the first by default,
  ``conv_width=C`` for a 1x1 convolution to ``C`` channels before the BN.
* The number of channels kept per layer (``K``) is the caller's (a pruning ratio); no adaptive
  stopping rule.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tricks import TricksError

__all__ = [
    "AuxHead", "AuxHeads", "attach_aux_heads", "forward_with_aux", "reconstruction_loss", "channel_scores",
    "select_channels", "layer_io", "stage_aux_loss", "DEFAULT_STEPS", "find_stages", "selectable", "prune_dcp",
]

DEFAULT_STEPS = 10  # gradient steps after each added channel
POWER_ITERATIONS = 20  # for the step size 1 / lambda_max


# --- auxiliary classifiers --------------------------------------------------------------------


class AuxHead(nn.Module):
    """The auxiliary classifier after a stage: ``[1x1 conv ->] BN -> ReLU -> global average pool ->
    linear``. ``conv_width`` (optional) adds the 1x1 convolution to that many channels first."""

    def __init__(self, in_channels: int, num_classes: int, conv_width: int | None = None):
        super().__init__()
        if in_channels < 1 or num_classes < 1 or (conv_width is not None and conv_width < 1):
            raise TricksError(f"AuxHead needs positive sizes, got in_channels={in_channels}, "
                              f"num_classes={num_classes}, conv_width={conv_width}: pass counts of at least 1")
        width = in_channels if conv_width is None else conv_width
        self.conv = None if conv_width is None else nn.Conv2d(in_channels, conv_width, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None:
            x = self.conv(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1), 1))


class AuxHeads(nn.ModuleDict):
    """An ``nn.ModuleDict`` of heads keyed by ``aux_key(stage_name)`` (dots are not allowed in
    module names); ``stage_names`` maps each key back to the stage's name in the model."""

    def __init__(self, heads: Mapping[str, nn.Module]):
        keys = {}
        for name in heads:
            key = name.replace(".", "_")
            if key in keys:
                raise TricksError(f"stages '{keys[key]}' and '{name}' would share the head key '{key}': "
                                  "name each stage once")
            keys[key] = name
        super().__init__({key: heads[name] for key, name in keys.items()})
        self.stage_names: dict[str, str] = keys


def _module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        close = [n for n in modules if n and (n.startswith(name) or name.startswith(n))][:3]
        hint = f" (near: {', '.join(close)})" if close else ""
        raise TricksError(f"the model has no module '{name}'{hint}: name a stage as model.named_modules() "
                          "lists it, e.g. 'stages.0'")
    return modules[name]


def _classes(model: nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TricksError("cannot tell the number of classes: the model has no nn.Linear; pass num_classes=")
    return linears[-1].out_features


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the block, each one's own mode back afterwards."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


def attach_aux_heads(model: nn.Module, stage_names: Iterable[str], num_classes: int | None = None,
                     example_input: Tensor | None = None, conv_width: int | None = None) -> AuxHeads:
    """One :class:`AuxHead` per named stage, on the model's device and dtype; the model is not changed
    (the heads are not registered in it). The classes are the model's last ``nn.Linear``'s outputs
    unless ``num_classes`` is given; a stage's channels are read from ``example_input`` run through the
    model in eval mode when given, else from the stage's last ``BatchNorm2d``."""
    names = list(stage_names)
    if not names:
        raise TricksError("no stage named for the auxiliary heads: name at least one, e.g. 'stages.0'")
    stages = {name: _module(model, name) for name in names}
    classes = _classes(model) if num_classes is None else num_classes
    channels: dict[str, int] = {}
    if example_input is not None:
        shapes = {}
        hooks = [stage.register_forward_hook(lambda m, i, o, n=name: shapes.__setitem__(n, tuple(o.shape)))
                 for name, stage in stages.items()]
        try:
            with torch.no_grad(), _eval_mode(model):
                model(example_input)
        finally:
            for h in hooks:
                h.remove()
        for name in names:
            if name not in shapes or len(shapes[name]) != 4:
                raise TricksError(f"stage '{name}' gave no 4-d feature map on the example input: "
                                  "name a module whose output is (batch, channels, height, width)")
            channels[name] = shapes[name][1]
    else:
        for name, stage in stages.items():
            norms = [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)]
            if not norms:
                raise TricksError(f"cannot tell the channels of stage '{name}' (no BatchNorm2d in it): "
                                  "pass example_input= (one batch of images)")
            channels[name] = norms[-1].num_features
    like = next(model.parameters(), None)
    heads = AuxHeads({name: AuxHead(channels[name], classes, conv_width) for name in names})
    return heads if like is None else heads.to(device=like.device, dtype=like.dtype)


def _head_names(heads: Mapping[str, nn.Module]) -> dict[str, str]:
    return dict(getattr(heads, "stage_names", {key: key for key in heads}))


def forward_with_aux(model: nn.Module, heads: Mapping[str, nn.Module], x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """``(final logits, {stage name: that stage's head's logits})`` from one forward pass of ``model``
    on ``x``. Each head runs on its stage's output inside a forward hook (before any later in-place
    operation can change it); the hooks are removed before returning. ``heads`` is what
    :func:`attach_aux_heads` returns, or any mapping from stage name to head."""
    aux: dict[str, Tensor] = {}
    hooks = []
    try:
        for key, name in _head_names(heads).items():
            head = heads[key]
            hooks.append(_module(model, name).register_forward_hook(
                lambda m, i, o, n=name, h=head: aux.__setitem__(n, h(o))))
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    missing = [name for name in _head_names(heads).values() if name not in aux]
    if missing:
        raise TricksError(f"stage(s) {', '.join(missing)} did not run in the model's forward: name stages that do")
    return logits, aux


# --- the joint loss and the scores -----------------------------------------------------------


def reconstruction_loss(baseline_out: Tensor, pruned_out: Tensor, reduction: str = "batch") -> Tensor:
    """``L_M = 1/(2Q) ||F - F'||^2``. ``reduction="batch"``: ``Q`` is the batch size (the first
    dimension), the squared error summed over channels and positions, averaged over the batch, halved;
    ``"mean"``: the mean squared error over every element (the authors' code, ``nn.MSELoss``), which
    keeps ``L_M`` of the order of the activations' variance whatever the layer's size."""
    if baseline_out.shape != pruned_out.shape:
        raise TricksError(f"the baseline's output has shape {tuple(baseline_out.shape)} and the pruned layer's "
                          f"{tuple(pruned_out.shape)}: compare the same layer's output on the same batch")
    if reduction not in ("batch", "mean"):
        raise TricksError(f"reduction must be 'batch' or 'mean', got {reduction!r}")
    squared = (baseline_out - pruned_out).pow(2)
    return squared.mean() if reduction == "mean" else squared.sum() / (2 * baseline_out.shape[0])


def _scores(grad: Tensor) -> Tensor:
    """Per input channel (dimension 1), the sum of the squared gradients of its weights."""
    return grad.pow(2).sum(dim=[d for d in range(grad.dim()) if d != 1])


def channel_scores(weight: Tensor, loss: Tensor) -> Tensor:
    """``S_k = sum over the weights that read input channel k of (dL/dW)^2`` for a layer whose
    ``weight`` is laid out ``(out, in, ...)`` (convolutions, linear layers): one non-negative score per
    input channel. ``loss`` must depend on ``weight`` through autograd."""
    if not weight.requires_grad:
        raise TricksError("the weight does not require grad: score a tensor the loss was computed from "
                          "with requires_grad=True")
    if weight.dim() < 2:
        raise TricksError(f"a weight of shape {tuple(weight.shape)} has no input-channel dimension: "
                          "score a convolution's or linear layer's weight")
    (grad,) = torch.autograd.grad(loss, weight, allow_unused=True)
    return torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device) if grad is None else _scores(grad)


# --- greedy selection -------------------------------------------------------------------------


def _check(conv: nn.Module, inputs: Tensor, target: Tensor, keep: int, steps: int,
           lr: float | None, alpha: float) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise TricksError(f"DCP selects the input channels of an nn.Conv2d, got {type(conv).__name__}: "
                          "leave this layer out of the pruned ones")
    if conv.groups != 1:
        raise TricksError(f"DCP cannot select input channels of a grouped convolution (groups={conv.groups}): "
                          "leave grouped and depthwise convolutions out of the pruned ones")
    c_in = conv.in_channels
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= c_in:
        raise TricksError(f"keep must be a whole number of channels from 1 to {c_in}, got {keep!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise TricksError(f"steps must be a whole number of at least 0, got {steps!r}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise TricksError(f"lr must be a positive number (or None for 1/lambda_max), got {lr!r}")
    if not math.isfinite(alpha) or alpha < 0:
        raise TricksError(f"alpha must be a number of at least 0, got {alpha!r}")
    if inputs.dim() != 4 or inputs.shape[1] != c_in:
        raise TricksError(f"the layer's inputs must be (batch, {c_in}, height, width), got {tuple(inputs.shape)}: "
                          "pass the activations that enter this layer")
    with torch.no_grad():
        shape = conv(inputs[:1].to(conv.weight)).shape[1:]
    if target.dim() != 4 or target.shape[0] != inputs.shape[0] or target.shape[1:] != shape:
        raise TricksError(f"the target must be the baseline layer's output, ({inputs.shape[0]}, "
                          f"{', '.join(map(str, shape))}) for these inputs, got {tuple(target.shape)}")


def _step_size(conv: nn.Conv2d, inputs: Tensor, reduction: str = "batch") -> float:
    """``1 / lambda_max`` of the reconstruction loss's Hessian ``(X^T X) / Q`` over all input channels,
    by power iteration with a fixed start (the global random state is not touched)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(conv.weight.shape, generator=gen, dtype=conv.weight.dtype).to(conv.weight.device)
    v = v / v.norm()
    lam = 0.0
    for _ in range(POWER_ITERATIONS):
        v.requires_grad_(True)
        out = conv._conv_forward(inputs, v, None)
        quad = reconstruction_loss(torch.zeros_like(out), out, reduction)
        (hv,) = torch.autograd.grad(quad, v)
        lam = float(hv.norm())
        if not math.isfinite(lam) or lam <= 0:
            return 1.0  # zero inputs: every gradient of the reconstruction is zero, any step is safe
        v = (hv / lam).detach()
    return 1.0 / lam


def select_channels(conv: nn.Conv2d, inputs: Tensor, target: Tensor, keep: int,
                    aux_loss: Callable[[Tensor], Tensor] | None = None, alpha: float = 1.0,
                    steps: int = DEFAULT_STEPS, lr: float | None = None,
                    reduction: str = "batch") -> tuple[list[int], Tensor]:
    """Select ``keep`` input channels of ``conv`` greedily and re-optimize their weights (DCP).

    ``inputs``: the layer's input ``X`` in the pruned network, ``(Q, C_in, H, W)``; ``target``: the
    baseline layer's output ``F`` on the same batch; ``aux_loss``: optional callable from this layer's
    output to the auxiliary (discrimination) loss, weighted by ``alpha``; ``steps``: gradient steps
    after each added channel; ``lr``: their step size (``None``: ``1 / lambda_max``, see the module).
    ``reduction``: that of :func:`reconstruction_loss`. ``conv`` is not changed. Returns the selected channels, sorted, and their re-optimized weights
    ``(C_out, keep, kh, kw)`` in that order, ready for the pruned layer."""
    _check(conv, inputs, target, keep, steps, lr, alpha)
    w0 = conv.weight.detach()
    inputs, target = inputs.detach().to(w0), target.detach().to(w0)
    bias = None if conv.bias is None else conv.bias.detach()
    c_in = conv.in_channels

    def loss_and_grad(w_eff: Tensor) -> tuple[float, Tensor]:
        w_eff = w_eff.detach().requires_grad_(True)
        out = conv._conv_forward(inputs, w_eff, bias)
        loss = reconstruction_loss(target, out, reduction)
        if aux_loss is not None and alpha:
            loss = loss + alpha * aux_loss(out)
        (grad,) = torch.autograd.grad(loss, w_eff)
        return float(loss.detach()), grad

    with torch.enable_grad():
        step0 = _step_size(conv, inputs, reduction) if lr is None else float(lr)
        selected = torch.ones(c_in, dtype=torch.bool, device=w0.device) if keep == c_in else \
            torch.zeros(c_in, dtype=torch.bool, device=w0.device)
        w = w0.clone()
        loss, grad = loss_and_grad(w * _shape(selected, w))
        order = list(range(c_in)) if keep == c_in else []
        while True:
            if len(order) < keep:
                scores = _scores(grad).masked_fill(selected, -math.inf)
                k = int(torch.argmax(scores))
                order.append(k)
                selected[k] = True
                loss, grad = loss_and_grad(w * _shape(selected, w))
            w, loss, grad = _reoptimize(w, selected, loss, grad, loss_and_grad, steps, step0)
            if len(order) == keep:
                break
    indices = sorted(order)
    return indices, w[:, indices].detach().clone()


def _shape(mask: Tensor, w: Tensor) -> Tensor:
    return mask.to(w.dtype).view(1, -1, *([1] * (w.dim() - 2)))


def _reoptimize(w: Tensor, selected: Tensor, loss: float, grad: Tensor,
                loss_and_grad: Callable[[Tensor], tuple[float, Tensor]], steps: int,
                lr: float) -> tuple[Tensor, float, Tensor]:
    """``steps`` gradient steps on the selected channels' weights (the others stay at zero in the
    layer's output and unchanged in ``w``); a step that raises the loss is undone and ``lr`` halved.
    Returns the weights, their loss and the gradient there (for the next channel's scores)."""
    m = _shape(selected, w)
    for _ in range(steps):
        candidate = w - lr * grad * m
        c_loss, c_grad = loss_and_grad(candidate * m)
        if math.isfinite(c_loss) and c_loss <= loss:
            w, loss, grad = candidate, c_loss, c_grad
        else:
            lr /= 2
    return w, loss, grad


# --- activations of a layer, and a stage head's loss as a function of a layer's output --------


def layer_io(model: nn.Module, layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The input and output of ``layer`` (a module inside ``model``) when ``model`` runs on ``x`` in eval
    mode, without gradients; the model's modes and hooks are left as they were."""
    seen: dict[str, Tensor] = {}

    def grab(module, args, output):
        seen["in"], seen["out"] = args[0].detach().clone(), output.detach().clone()

    hook = layer.register_forward_hook(grab)
    try:
        with torch.no_grad(), _eval_mode(model):
            model(x)
    finally:
        hook.remove()
    if "in" not in seen:
        raise TricksError("the layer did not run in the model's forward: pass a module of this model")
    return seen["in"], seen["out"]


def stage_aux_loss(stage: nn.Module, layer: nn.Module, head: nn.Module, stage_input: Tensor, labels: Tensor,
                   loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> Callable[[Tensor], Tensor]:
    """The auxiliary loss ``L_S`` as a function of ``layer``'s output, for :func:`select_channels`.

    The returned callable runs ``stage`` (a module that holds ``layer`` and takes one tensor) on
    ``stage_input`` in eval mode with ``layer``'s output replaced by its argument, and returns
    ``loss_fn(head(stage output), labels)``, differentiable with respect to the argument. Only the
    stage runs, not the layers before it: capture ``stage_input`` once with
    ``layer_io(model, stage, images)[0]``, on the batch whose activations are ``select_channels``'s
    ``inputs``."""
    if not any(m is layer for m in stage.modules()):
        raise TricksError("the layer is not inside the stage: pass the stage module that holds the layer")
    stage_input = stage_input.detach()

    def aux(layer_out: Tensor) -> Tensor:
        replace = layer.register_forward_hook(lambda m, i, o: layer_out.clone())
        try:
            with _eval_mode(stage, head):
                return loss_fn(head(stage(stage_input)), labels)
        finally:
            replace.remove()

    return aux


# --- DCP as a pruning step of a whole model ---------------------------------------------------


def find_stages(model: nn.Module) -> list[str]:
    """The names of the model's stages, where the auxiliary heads go: the children of a module
    named ``stages`` (the project's ResNets and AnyNet/RegNet, many timm models), else timm
    ResNets' ``layer1``, ``layer2``, ...; a ``TricksError`` naming the setting when neither is found."""
    modules = dict(model.named_modules())
    stages = modules.get("stages")
    if isinstance(stages, (nn.Sequential, nn.ModuleList)) and len(stages):
        return [f"stages.{name}" for name, _ in stages.named_children()]
    layers = [f"layer{i}" for i in range(1, 10) if f"layer{i}" in modules]
    if layers:
        return layers
    raise TricksError(f"prune: cannot tell the stages of {type(model).__name__} for DCP's auxiliary heads (it has no "
                      "'stages' module and no 'layer1'); name them with prune.aux_stages=[...]")


def selectable(groups) -> list[tuple[object, str]]:
    """``[(group, consumer name)]``: the prunable groups whose channels are read by exactly one
    plain convolution (``groups=1``) and by no other conv or linear layer, in module order; DCP
    selects that convolution's inputs. A residual stream (read by several layers), a group cut in
    positions (a grouped convolution) or one read by a linear layer is left to the other criteria."""
    out = []
    for g in groups:
        if not g.prunable or g.ch_groups != 1:
            continue
        readers = [m for m in g.members if not m.out and m.kind == "layer"]
        if len(readers) == 1 and isinstance(readers[0].module, nn.Conv2d) and readers[0].module.groups == 1 \
                and sorted(readers[0].idxs) == list(range(g.size)):
            out.append((g, readers[0].name))
    return out


def prune_dcp(model: nn.Module, example_inputs: Tensor, images: Tensor, labels: Tensor, ratio: float,
              heads: Mapping[str, nn.Module] | None = None, exclude: Iterable[str] = (), min_channels: int = 1,
              alpha: float = 1.0, steps: int = DEFAULT_STEPS, log: Callable[[str], None] | None = None,
              loss_fn: Callable[[Tensor, Any], Tensor] = F.cross_entropy, within: Iterable[str] | None = None) -> dict:
    """Prune ``model`` in place by DCP and return the change as data (like ``prune_model``).

    Every group :func:`selectable` finds loses ``round(ratio * channels)`` channels (at least
    ``min_channels`` stay), layer by layer in module order: the input channels of the layer that
    reads the group are selected by :func:`select_channels` on ``images`` (its input ``X`` from the
    model pruned so far, its target ``F`` from the model as it was before this step), with the
    auxiliary loss of the head of the stage that holds the layer (``heads``, from
    :func:`attach_aux_heads`; a layer in no headed stage uses the reconstruction alone) on
    ``labels`` (class indices or soft targets) weighted by ``alpha``; the channels not selected are
    removed with everything coupled to them, and the layer gets the re-optimized weights.
    ``example_inputs``: one image the model accepts, to trace it. ``loss_fn(head output, labels)``
    is the auxiliary loss (cross-entropy by default; LCP passes heads that return their loss and
    ``lambda loss, _: loss``); ``within``, when given, names the modules whose layers alone are
    pruned (LCP prunes a detector's backbone one stage at a time)."""
    from .graph import apply_steps, find_groups
    from .pruning import input_step

    if not 0 <= ratio < 1:
        raise TricksError(f"prune: ratio must be at least 0 and below 1 (the fraction removed), got {ratio!r}")
    exclude = list(exclude)
    dg, groups = find_groups(model, example_inputs, exclude, min_channels)
    head_of = {name: heads[key] for key, name in _head_names(heads or {}).items()}
    chosen = [(g, r) for g, r in selectable(groups)
              if within is None or any(r.startswith(w + ".") for w in within)]
    chosen = [(g, r) for g, r in chosen if not _feeds_heads(model, example_inputs, g, list(head_of))]
    total = sum(g.size for g, _ in chosen)
    info = {"criterion": "dcp", "scope": "layer", "target": "channels", "ratio": float(ratio), "groups": len(chosen)}
    if ratio == 0 or not chosen:
        return {"steps": [], **info, "channels": [total, total]}
    baseline = copy.deepcopy(model)
    done: list[dict] = []
    removed = 0
    for g, reader_name in chosen:
        k = min(math.floor(ratio * g.size + 0.5), g.size - max(1, min_channels))
        if k <= 0:
            continue
        reader = model.get_submodule(reader_name)
        x_in, _ = layer_io(model, reader, images)
        _, target = layer_io(baseline, baseline.get_submodule(reader_name), images)
        aux = None
        stage_name = next((s for s in head_of if reader_name.startswith(s + ".")), None)
        if stage_name is not None and alpha:
            stage = model.get_submodule(stage_name)
            stage_input, _ = layer_io(model, stage, images)
            aux = stage_aux_loss(stage, reader, head_of[stage_name], stage_input, labels, loss_fn)
        keep, weight = select_channels(reader, x_in, target, g.size - k, aux, alpha, steps, reduction="mean")
        kept = set(keep)
        step = input_step(groups, reader_name, [i for i in range(g.size) if i not in kept])
        apply_steps(model, example_inputs, [step], dg)
        with torch.no_grad():
            reader.weight.copy_(weight)
        done.append(step)
        removed += len(step["idxs"])
        if log is not None:
            log(f"dcp: {reader_name} reads {g.size - k} of {g.size} channels")
    return {"steps": done, **info, "channels": [total, total - removed]}


def _widths(model: nn.Module, example_inputs: Tensor, stages: list[str]) -> dict[str, int]:
    seen: dict[str, int] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.shape[1]))
             for n in stages]
    try:
        with torch.no_grad(), _eval_mode(model), torch.random.fork_rng(devices=[]):
            model(example_inputs[:1])
    finally:
        for h in hooks:
            h.remove()
    return seen


def _feeds_heads(model: nn.Module, example_inputs: Tensor, group, stages: list[str]) -> bool:
    """Whether the channels of ``group`` are (coupled with) the output of a stage that has an
    auxiliary head: removing them would change what the head reads, so DCP leaves them. Tried on a
    copy with one channel removed (a plain network's stage output read by one convolution)."""
    from .graph import apply_steps

    if not stages:
        return False
    clone = copy.deepcopy(model)
    apply_steps(clone, example_inputs, [{"layer": group.key, "idxs": [0]}])
    return _widths(clone, example_inputs, stages) != _widths(model, example_inputs, stages)
