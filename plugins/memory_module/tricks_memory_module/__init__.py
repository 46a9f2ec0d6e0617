"""Learning from web data with a (self-organizing) memory module, after Tu, Niu, Chen, Cheng and
Zhang (CVPR 2020, arXiv 1906.12028).

Multi-instance learning on noisy data. Every training image gives regions of interest (ROIs): the
whole image and a fixed set of crops (a ``grid x grid`` grid of crops of side ``crop_scale``,
plus optionally ``random_regions`` random crops), each pooled from the backbone's last feature map
(the whole image by global average pooling, as the classifier sees it at test time; the crops by
``torchvision.ops.roi_align``). Images of the same (noisy) label form *bags* of ``bag_size``
images; every ROI of a bag gets a weight, the weights of a bag sum to 1, and the bag's weighted
feature goes through the classifier and the classification loss.

The weights come from a memory of ``L = rows x cols`` slots. Slot ``l`` holds a key ``k_l`` (a
cluster centre of the L2-normalised ROI features) and a value ``v_l`` (a histogram of the labels
of the ROIs it won). From the values:

* discriminative score ``d_l = 1 - H(v_l / |v_l|) / log K``: 1 for a one-hot histogram, 0 for a
  uniform (or empty) one, so clusters shared by many classes (background, wrong images) score low;
* representative score ``r_{l,c} = v_{l,c} / sum_l' v_{l',c}``: the share of class ``c``'s ROIs
  that fall into slot ``l``;
* a ROI with nearest slot ``l*`` in a bag of label ``c`` scores ``s = d_{l*} r_{l*,c}``; its weight
  is ``s`` divided by the sum over its bag (uniform when every score of the bag is 0).

After the weights are taken, the memory is updated as a self-organizing map with the batch's ROI
features: the winner ``w_i`` of feature ``f_i`` (its nearest key) and its neighbours on the
``rows x cols`` grid move toward the feature, by ``lr * h(l, w_i)`` with the neighbourhood
``h = exp(-grid_distance^2 / (2 sigma^2))`` (1 at the winner), ``sigma`` shrinking from ``sigma``
to ``sigma_end`` over the run; the values decay by ``value_decay`` and the winner's value gains
one count of the ROI's label. The functions below are the math, usable without the framework;
:class:`MemoryModule` wires them to a run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import tricks
from tricks import atomic
from tricks.data import Sampler, epoch_generator

__version__ = "0.1.0"

FIGURE = "memory_regions.png"
REGIONS = "memory_regions.json"


# --- regions of interest -------------------------------------------------------------------------


def grid_boxes(height: int, width: int, grid: int, crop_scale: float) -> torch.Tensor:
    """``[grid * grid, 4]`` boxes ``(x1, y1, x2, y2)`` in pixels: crops of ``crop_scale`` of the
    image's side, their corners evenly spaced from the top left to the bottom right."""
    if grid == 0:
        return torch.zeros(0, 4)
    ch, cw = crop_scale * height, crop_scale * width
    ys = torch.linspace(0, height - ch, grid) if grid > 1 else torch.tensor([(height - ch) / 2])
    xs = torch.linspace(0, width - cw, grid) if grid > 1 else torch.tensor([(width - cw) / 2])
    y0, x0 = torch.meshgrid(ys, xs, indexing="ij")
    y0, x0 = y0.flatten(), x0.flatten()
    return torch.stack([x0, y0, x0 + cw, y0 + ch], dim=1)


def random_boxes(count: int, per_image: int, height: int, width: int, min_scale: float,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """``[count, per_image, 4]`` random boxes: side fractions uniform in ``[min_scale, 1]``
    (height and width drawn separately), positions uniform; drawn from torch's global generator."""
    scale = min_scale + (1 - min_scale) * torch.rand(count, per_image, 2, device=device)
    size = scale * torch.tensor([width, height], device=device, dtype=torch.float32)
    corner = torch.rand(count, per_image, 2, device=device) * (torch.tensor([width, height], device=device) - size)
    return torch.cat([corner, corner + size], dim=2)


def roi_features(fmap: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """``[B, 1 + R, D]`` ROI features of a feature map ``[B, D, h, w]``: the whole image (global
    average pooling) then the ``R`` boxes of each image (``boxes``: ``[R, 4]`` for the same boxes in
    every image, or ``[B, R, 4]``; pixels of an ``image_size = (H, W)`` input), each pooled by
    ``roi_align`` to 2x2 bins (2 samples a bin, pixel-aligned) and averaged."""
    from torchvision.ops import roi_align

    b, d, h, w = fmap.shape
    whole = fmap.mean(dim=(2, 3)).unsqueeze(1)
    if boxes.dim() == 2:
        boxes = boxes.unsqueeze(0).expand(b, -1, -1)
    r = boxes.shape[1]
    if r == 0:
        return whole
    index = torch.arange(b, device=fmap.device, dtype=torch.float32).repeat_interleave(r).unsqueeze(1)
    rois = torch.cat([index, boxes.reshape(-1, 4).to(fmap.device, torch.float32)], dim=1)
    scale = w / image_size[1]
    pooled = roi_align(fmap, rois, output_size=(2, 2), spatial_scale=scale, sampling_ratio=2, aligned=True)
    crops = pooled.mean(dim=(2, 3)).reshape(b, r, d)
    return torch.cat([whole, crops.to(whole.dtype)], dim=1)


# --- bags ------------------------------------------------------------------------------------------


def group_bags(labels: torch.Tensor, bag_size: int) -> tuple[torch.Tensor, int]:
    """``(bag of every image, number of bags)``: the images of each label, in batch order, cut
    into bags of ``bag_size`` (the last bag of a label may be smaller). Bags are numbered by
    label, then by their order in the batch."""
    n = len(labels)
    order = torch.sort(labels, stable=True).indices
    ranked = labels[order]
    first = torch.searchsorted(ranked, ranked, right=False)  # where each label starts in the sorted batch
    rank = torch.arange(n, device=labels.device) - first
    key = ranked * (n + 1) + torch.div(rank, bag_size, rounding_mode="floor")
    unique, inverse = torch.unique(key, return_inverse=True)
    bag = torch.empty_like(inverse)
    bag[order] = inverse
    return bag, len(unique)


class BagSampler(Sampler):
    """Epochs made of whole bags: every class's examples in a random order, cut into bags of
    ``bag_size`` (the last one filled up with other examples of the class, drawn at random), the
    bags shuffled. With a batch size that is a multiple of ``bag_size``, every batch is whole bags.
    Drawn from ``(seed, epoch)`` alone; ``len`` is ``sum_c ceil(n_c / bag_size) * bag_size``."""

    def __init__(self, labels: torch.Tensor, bag_size: int):
        self.bag_size = bag_size
        self.members = [(labels == c).nonzero().flatten() for c in torch.unique(labels).tolist()]
        self.length = sum(-(-len(m) // bag_size) * bag_size for m in self.members)

    def __len__(self) -> int:
        return self.length

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        g = epoch_generator(seed, epoch)
        bags = []
        for members in self.members:
            shuffled = members[torch.randperm(len(members), generator=g)]
            short = -len(shuffled) % self.bag_size
            if short:
                shuffled = torch.cat([shuffled, members[torch.randint(0, len(members), (short,), generator=g)]])
            bags.append(shuffled.view(-1, self.bag_size))
        bags = torch.cat(bags)
        return bags[torch.randperm(len(bags), generator=g)].flatten()


# --- the memory's scores -------------------------------------------------------------------------


def discriminative_scores(values: torch.Tensor) -> torch.Tensor:
    """``[L]``: ``1 - H(p_l) / log K`` of each slot's class distribution ``p_l = v_l / |v_l|``;
    1 for a one-hot histogram, 0 for a uniform or empty one."""
    k = values.shape[1]
    mass = values.sum(1, keepdim=True)
    p = torch.where(mass > 0, values / mass.clamp_min(1e-12), torch.full_like(values, 1.0 / k))
    entropy = -torch.special.xlogy(p, p).sum(1)
    return (1 - entropy / math.log(k)).clamp(0, 1)


def representative_scores(values: torch.Tensor) -> torch.Tensor:
    """``[L, K]``: the share of class ``c``'s counts that slot ``l`` holds (0 for an unseen class)."""
    per_class = values.sum(0, keepdim=True)
    return torch.where(per_class > 0, values / per_class.clamp_min(1e-12), torch.zeros_like(values))


def bag_weights(scores: torch.Tensor, bag: torch.Tensor, num_bags: int) -> torch.Tensor:
    """``[N]`` weights of ROIs with non-negative ``scores`` in bags ``bag`` (``[N]``, ``0..num_bags-1``):
    each score divided by its bag's sum, so that a bag's weights sum to 1; a bag whose scores are
    all 0 gets uniform weights."""
    scores = scores.float()
    total = torch.zeros(num_bags, device=scores.device).index_add_(0, bag, scores)
    count = torch.zeros(num_bags, device=scores.device).index_add_(0, bag, torch.ones_like(scores))
    return torch.where(total[bag] > 0, scores / total[bag].clamp_min(1e-30), 1.0 / count[bag])


def grid_distances(rows: int, cols: int) -> torch.Tensor:
    """``[L, L]`` squared distances between the slots on the ``rows x cols`` grid (row-major)."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pos = torch.stack([r.flatten(), c.flatten()], dim=1).float()
    return torch.cdist(pos, pos).square()


def som_update(keys: torch.Tensor, features: torch.Tensor, winners: torch.Tensor, dist2: torch.Tensor,
               lr: float, sigma: float) -> torch.Tensor:
    """The keys after one self-organizing-map step (a new tensor): every key moves toward the
    features by ``lr * sum_i h(l, w_i) (f_i - k_l) / max(1, sum_i h(l, w_i))`` with the neighbourhood
    ``h(l, w) = exp(-dist2[l, w] / (2 sigma^2))`` (``sigma = 0``: the winner alone). One feature
    moves its winner by ``lr (f - k)`` and every other slot by less, the more the farther."""
    if sigma > 0:
        h = torch.exp(-dist2[:, winners] / (2 * sigma * sigma))  # [L, N]
    else:
        h = (torch.arange(len(keys), device=keys.device).unsqueeze(1) == winners.unsqueeze(0)).float()
    mass = h.sum(1, keepdim=True)
    pull = h @ features - mass * keys
    return keys + lr * pull / mass.clamp_min(1.0)


class Memory:
    """The memory module's state: ``keys [L, D]`` (None until the first features), ``values
    [L, K]`` (decayed class counts), ``hits [L]`` (ROIs each slot won, never decayed), ``updates``."""

    def __init__(self, rows: int, cols: int, num_classes: int):
        self.rows, self.cols, self.num_classes = rows, cols, num_classes
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.hits: torch.Tensor | None = None
        self.updates = 0
        self._dist2: torch.Tensor | None = None

    @property
    def slots(self) -> int:
        return self.rows * self.cols

    def dist2(self, device) -> torch.Tensor:
        if self._dist2 is None or self._dist2.device != torch.device(device):
            self._dist2 = grid_distances(self.rows, self.cols).to(device)
        return self._dist2

    def initialize(self, features: torch.Tensor, seed: int) -> None:
        """Keys from ROI features drawn at random (a generator of its own, seeded by ``seed``)."""
        g = torch.Generator().manual_seed(int(seed))
        pick = torch.randint(0, len(features), (self.slots,), generator=g).to(features.device)
        jitter = 1e-3 * torch.randn(self.slots, features.shape[1], generator=g).to(features.device)
        self.keys = features[pick].float() + jitter
        self.values = torch.zeros(self.slots, self.num_classes, device=features.device)
        self.hits = torch.zeros(self.slots, dtype=torch.int64, device=features.device)

    def nearest(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cdist(features.float(), self.keys).argmin(1)

    def scores(self, slots: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``d_l * r_{l,c}`` of each ROI's slot ``l`` and label ``c``."""
        d = discriminative_scores(self.values)
        r = representative_scores(self.values)
        return d[slots] * r[slots, labels]

    def update(self, features: torch.Tensor, labels: torch.Tensor, winners: torch.Tensor,
               lr: float, sigma: float, decay: float) -> None:
        self.keys = som_update(self.keys, features.float(), winners, self.dist2(features.device), lr, sigma)
        self.values = self.values * decay
        self.values.index_put_((winners, labels), torch.ones(len(winners), device=self.values.device), accumulate=True)
        self.hits += torch.bincount(winners, minlength=self.slots)
        self.updates += 1

    def state_dict(self) -> dict | None:
        if self.keys is None:
            return None
        return {"keys": self.keys.detach().cpu().clone(), "values": self.values.cpu().clone(),
                "hits": self.hits.cpu().clone(), "updates": self.updates, "rows": self.rows, "cols": self.cols}

    def load_state_dict(self, state: dict, device) -> None:
        if (state["rows"], state["cols"]) != (self.rows, self.cols):
            raise tricks.TricksError(f"the checkpoint's memory has {state['rows']}x{state['cols']} slots, the run "
                                     f"{self.rows}x{self.cols}; resume with the settings it was trained with")
        self.keys = state["keys"].to(device)
        self.values = state["values"].to(device)
        self.hits = state["hits"].to(device)
        self.updates = int(state["updates"])


# --- the backbone --------------------------------------------------------------------------------


def backbone_parts(model: nn.Module):
    """``(features, classifier)``: a function from the input to the last feature map ``[B, D, h, w]``
    and the linear layer that classifies its global average: the core's ResNets (``stem``,
    ``stages``, ``fc``) and timm models with ``forward_features`` and a linear classifier.
    None for any other model."""
    fc = getattr(model, "fc", None)
    if hasattr(model, "stem") and hasattr(model, "stages") and isinstance(fc, nn.Linear):
        return (lambda x: model.stages(model.stem(x))), fc
    if hasattr(model, "forward_features") and hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Linear):
            return model.forward_features, head
    return None


def check_backbone(model: nn.Module, in_chans: int, image_size: int, name: str) -> None:
    """Refuse a model whose output is not ``classifier(mean of features)`` (checked on one random
    input, in eval mode, with the global random state untouched)."""
    parts = backbone_parts(model)
    why = None
    if parts is None:
        why = "it has no feature map and linear classifier the plugin knows (stem/stages/fc, or timm's forward_features)"
    else:
        features, head = parts
        was = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                x = torch.randn(2, in_chans, image_size, image_size, generator=torch.Generator().manual_seed(0))
                fmap = features(x)
                if fmap.dim() != 4:
                    why = f"its features are {fmap.dim()}-dimensional, not a [B, C, H, W] feature map"
                elif not torch.allclose(model(x), head(fmap.mean(dim=(2, 3))), rtol=1e-4, atol=1e-4):
                    why = "its head is not global average pooling followed by its linear classifier"
        finally:
            model.train(was)
    if why:
        raise tricks.TricksError(f"memory_module pools regions from the model's last feature map, and model {name} does not "
                                 f"allow it ({why}); use a ResNet (--model resnet20, resnet18, timm:resnet18, ...)")


@dataclass
class BagOutput:
    """What the training forward pass gives the loss: the bags' logits ``[num_bags, K]``, the
    batch index of each bag's first image (its label is the bag's), and the ROI weights."""

    logits: torch.Tensor
    first: torch.Tensor
    weights: torch.Tensor


# --- the plugin ---------------------------------------------------------------------------------


class MemoryModuleSettings(tricks.Settings):
    bag_size: int = tricks.Field(4, ge=1, description="images of one (noisy) label in a bag; core.batch_size must be a multiple of it")
    grid: int = tricks.Field(2, ge=0, le=8, description="region proposals: a grid x grid grid of crops per image, beside the whole image")
    crop_scale: float = tricks.Field(0.6, gt=0, le=1, description="side of a grid crop (and the smallest side of a random crop), as a fraction of the image's")
    random_regions: int = tricks.Field(0, ge=0, le=64, description="random crops per image and step, beside the grid")
    rows: int = tricks.Field(8, ge=1, description="rows of the memory's self-organizing grid of slots")
    cols: int = tricks.Field(8, ge=1, description="columns of the memory's grid (L = rows x cols slots)")
    lr: float = tricks.Field(0.1, gt=0, le=1, description="self-organizing-map step: how far a winning key moves toward a feature")
    sigma: float = tricks.Field(2.0, ge=0, description="neighbourhood radius on the grid at the start (grid units; 0: the winner alone)")
    sigma_end: float = tricks.Field(0.5, ge=0, description="neighbourhood radius at the end of the run (geometric decay from sigma)")
    value_decay: float = tricks.Field(0.99, gt=0, le=1, description="factor on the class counts of every slot at every step (1: counts never fade)")
    figure_images: int = tricks.Field(64, ge=0, description="training images whose regions are ranked for memory_regions.png at the end (0: no figure)")
    figure_regions: int = tricks.Field(16, ge=1, le=64, description="regions shown in each of the figure's two rows: lowest and highest weights")


class MemoryModule(tricks.Plugin):
    """Multi-instance bags of regions weighted by a self-organizing memory of feature clusters
    and their class histograms, trained end to end with the classifier."""

    Settings = MemoryModuleSettings

    def __init__(self, settings: MemoryModuleSettings | None = None):
        super().__init__(settings)
        self.memory: Memory | None = None
        self._grid_cache: dict = {}

    # --- data: bags of one label ------------------------------------------------------------------
    @tricks.hookimpl
    def prepare_data(self, ctx, data):
        s = self.settings
        if ctx.world_size > 1:
            raise tricks.TricksError("memory_module keeps one memory in one process (it is not shared between processes); "
                                     "run it without torchrun")
        if s.grid == 0 and s.random_regions == 0 and s.bag_size == 1:
            raise tricks.TricksError("memory_module with grid=0, random_regions=0 and bag_size=1 weighs a single region per bag, "
                                     "which is plain training; raise memory_module.bag_size or add regions")
        if (s.rows * s.cols) < 2:
            raise tricks.TricksError(f"memory_module.rows x cols = {s.rows * s.cols} slot; a memory needs at least 2 slots")
        if ctx.core.batch_size % s.bag_size:
            raise tricks.TricksError(f"core.batch_size {ctx.core.batch_size} is not a multiple of memory_module.bag_size "
                                     f"{s.bag_size}; use a batch size that is (e.g. --batch-size "
                                     f"{max(s.bag_size, ctx.core.batch_size // s.bag_size * s.bag_size)})")
        if data.train is None:
            ctx.log("memory_module: imagefolder data: bags are formed within each random batch")
            return None
        if data.train_sampler is not None:
            ctx.log("memory_module: another plugin chose the training examples; bags are formed within each batch")
            return None
        sampler = BagSampler(data.train.y, s.bag_size)
        note = (f"memory_module: epochs of {len(sampler)} examples in bags of {s.bag_size} images of one label, "
                f"{1 + s.grid * s.grid + s.random_regions} regions an image, {s.rows}x{s.cols} memory slots")
        return dataclasses.replace(data, train_sampler=sampler, notes=[*data.notes, note])

    # --- model: a ResNet-like backbone ------------------------------------------------------------
    @tricks.hookimpl(wrapper=True)
    def build_model(self, ctx):
        model = yield
        check_backbone(model, ctx.in_chans, ctx.image_size, ctx.core.model)
        return model

    def _memory(self, ctx) -> Memory:
        """The run's memory, made for the classes of the data the model is built for."""
        if self.memory is None:
            self.memory = Memory(self.settings.rows, self.settings.cols, ctx.num_classes)
        return self.memory

    def _boxes(self, batch_size: int, height: int, width: int, device) -> torch.Tensor:
        s = self.settings
        key = (height, width, str(device))
        if key not in self._grid_cache:
            self._grid_cache[key] = grid_boxes(height, width, s.grid, s.crop_scale).to(device)
        fixed = self._grid_cache[key].unsqueeze(0).expand(batch_size, -1, -1)
        if s.random_regions == 0:
            return fixed
        extra = random_boxes(batch_size, s.random_regions, height, width, s.crop_scale, device)
        return torch.cat([fixed, extra], dim=1)

    def sigma_at(self, step: int, total: int) -> float:
        """The neighbourhood radius at ``step`` of ``total``: geometric from ``sigma`` to
        ``sigma_end`` (linear when ``sigma_end`` is 0)."""
        s = self.settings
        t = min(1.0, step / max(1, total))
        if s.sigma == 0:
            return 0.0
        if s.sigma_end == 0:
            return s.sigma * (1 - t)
        return s.sigma * (s.sigma_end / s.sigma) ** t

    def weigh(self, roi: torch.Tensor, labels: torch.Tensor, bag: torch.Tensor, num_bags: int,
              seed: int, step: int, total: int, update: bool = True) -> torch.Tensor:
        """``[B * R]`` weights of the ROI features ``roi [B, R, D]`` of images with ``labels`` in
        bags ``bag``, from the memory as it is; then (``update``) the memory learns the features."""
        s, memory = self.settings, self.memory
        b, r, d = roi.shape
        with torch.autocast(roi.device.type, enabled=False), torch.no_grad():
            features = F.normalize(roi.detach().float().flatten(0, 1), dim=1)
            roi_labels = labels.repeat_interleave(r)
            roi_bags = bag.repeat_interleave(r)
            if memory.keys is None or memory.keys.shape[1] != d:  # the first step; a model pruned to fewer features
                memory.initialize(features, seed)
            slots = memory.nearest(features)
            weights = bag_weights(memory.scores(slots, roi_labels), roi_bags, num_bags)
            if update:
                memory.update(features, roi_labels, slots, s.lr, self.sigma_at(step, total), s.value_decay)
        return weights

    @tricks.hookimpl
    def forward(self, ctx, model, batch):
        x, target = batch["input"], batch["target"]
        if target.is_floating_point():
            raise tricks.TricksError("memory_module groups images into bags by their label, and this batch has soft targets "
                                     "(mixup, cutmix, ...); leave those plugins out of a memory_module run")
        self._memory(ctx)
        features, head = backbone_parts(model)
        fmap = features(x)
        h, w = x.shape[-2:]
        roi = roi_features(fmap, self._boxes(len(x), h, w, x.device), (h, w))
        bag, num_bags = group_bags(target, self.settings.bag_size)
        weights = self.weigh(roi, target, bag, num_bags, ctx.core.seed, ctx.step, ctx.total_steps)
        r = roi.shape[1]
        weighted = roi.float().flatten(0, 1) * weights.unsqueeze(1)
        pooled = torch.zeros(num_bags, roi.shape[2], device=x.device).index_add_(0, bag.repeat_interleave(r), weighted)
        first = torch.full((num_bags,), len(x), device=x.device, dtype=torch.int64)
        first = first.scatter_reduce(0, bag, torch.arange(len(x), device=x.device), reduce="amin")
        return BagOutput(head(pooled), first, weights.view(len(x), r))

    # the innermost loss wrapper: every other wrapper sees the output and the batch of images as
    # they are (a pruning plugin's auxiliary loss on the images' labels), and only the base loss
    # sees the bags' logits and labels
    @tricks.hookimpl(wrapper=True, trylast=True)
    def build_loss(self, ctx):
        inner = yield

        def bag_loss(output, batch):
            if isinstance(output, BagOutput):  # the bags' logits against the bags' labels
                return inner(output.logits, {**batch, "target": batch["target"][output.first]})
            return inner(output, batch)

        return bag_loss

    # --- what the memory learned ------------------------------------------------------------------
    @tricks.hookimpl
    def on_epoch_end(self, ctx, epoch, metrics):
        memory = self.memory
        if memory is None or memory.values is None:
            return
        mass = memory.values.sum(1)
        d = discriminative_scores(memory.values)
        metrics["memory_slots_used"] = int((mass > 0).sum())
        metrics["memory_discriminative"] = float((d * mass).sum() / mass.sum().clamp_min(1e-12))

    @tricks.hookimpl
    def on_fit_end(self, ctx, summary):
        s = self.settings
        data = ctx.data
        if not ctx.is_main or ctx.run_dir is None or s.figure_images == 0 or self.memory is None or self.memory.keys is None:
            return
        if data is None or getattr(data, "train", None) is None:
            ctx.log("memory_module: no in-memory training split to draw memory_regions.png from; skipped")
            return
        ranked = rank_regions(ctx.model, self, data, s.figure_images, ctx.device)
        write_figure(ranked, data, Path(ctx.run_dir) / FIGURE, s.figure_regions)
        atomic.write_text(Path(ctx.run_dir) / REGIONS, json.dumps(ranked["rows"]))
        summary["memory_regions_png"] = FIGURE

    # --- checkpoint --------------------------------------------------------------------------------
    @tricks.hookimpl
    def state_dict(self, ctx):
        return self.memory.state_dict() if self.memory is not None else None

    @tricks.hookimpl
    def load_state_dict(self, ctx, state):
        if state is not None:
            self._memory(ctx).load_state_dict(state, ctx.device)


def rank_regions(model: nn.Module, plugin: MemoryModule, data, count: int, device) -> dict:
    """The regions (whole image and grid crops) of the first ``count`` training images, scored by
    the memory under their training labels: ``{"rows": [...], "boxes": [R, 4]}``, each row an
    image index, region index, box, label, slot, score ``d * r`` and the weight within the
    image's own regions (and ``noisy`` when the split records its noise)."""
    s = plugin.settings
    train = data.train
    n = min(count, len(train.y))
    x8, labels = train.x[:n], train.y[:n]
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    x = (x8.float() - mean) / std
    if x.shape[-1] != data.image_size:
        x = F.interpolate(x, size=(data.image_size, data.image_size), mode="bilinear", align_corners=False)
    h, w = x.shape[-2:]
    boxes = grid_boxes(h, w, s.grid, s.crop_scale)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            features, _ = backbone_parts(model)
            roi = roi_features(features(x.to(device)), boxes.to(device), (h, w)).float()
            r = roi.shape[1]
            feats = F.normalize(roi.flatten(0, 1), dim=1)
            roi_labels = labels.to(device).repeat_interleave(r)
            slots = plugin.memory.nearest(feats)
            scores = plugin.memory.scores(slots, roi_labels)
            weights = bag_weights(scores, torch.arange(n, device=device).repeat_interleave(r), n)
    finally:
        model.train(was)
    all_boxes = torch.cat([torch.tensor([[0.0, 0.0, float(w), float(h)]]), boxes])
    noisy = getattr(train, "is_noisy", None)
    rows = []
    for i in range(n * r):
        image, region = divmod(i, r)
        row = {"image": image, "region": region, "box": [round(v, 3) for v in all_boxes[region].tolist()],
               "label": int(labels[image]), "slot": int(slots[i]), "score": float(scores[i]), "weight": float(weights[i])}
        if noisy is not None:
            row["noisy"] = bool(noisy[image])
        rows.append(row)
    return {"rows": rows, "size": (h, w)}


def write_figure(ranked: dict, data, path: Path, per_row: int) -> None:
    """A PNG of the regions with the lowest and the highest scores, each titled with its label and
    score (red: an image the noise plugin corrupted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ranked["rows"]
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["score"], i))
    k = min(per_row, len(rows))
    groups = [("lowest", order[:k]), ("highest", order[::-1][:k])]
    h, w = ranked["size"]
    fig, axes = plt.subplots(2, k, figsize=(1.3 * k, 3.2), squeeze=False)
    for g, (name, picks) in enumerate(groups):
        for j in range(k):
            ax = axes[g][j]
            ax.axis("off")
            if j >= len(picks):
                continue
            row = rows[picks[j]]
            img = data.train.x[row["image"]].float()
            if img.shape[-1] != w:
                img = F.interpolate(img.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False)[0]
            x1, y1, x2, y2 = row["box"]
            crop = img[:, int(math.floor(y1)):max(int(math.ceil(y2)), int(math.floor(y1)) + 1),
                       int(math.floor(x1)):max(int(math.ceil(x2)), int(math.floor(x1)) + 1)]
            crop = crop.clamp(0, 255).byte().permute(1, 2, 0).numpy()
            ax.imshow(crop[..., 0] if crop.shape[-1] == 1 else crop, cmap="gray" if crop.shape[-1] == 1 else None,
                      vmin=0, vmax=255)
            ax.set_title(f"{row['label']}: {row['score']:.3g}", fontsize=7, color="red" if row.get("noisy") else "black")
        axes[g][0].text(-0.15, 0.5, name, transform=axes[g][0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
    fig.suptitle("memory_module: regions by score d*r (label: score; red = corrupted by noisy_data)", fontsize=8)
    fig.tight_layout()
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
