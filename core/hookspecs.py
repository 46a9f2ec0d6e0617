"""The hook specifications of tricks: the one place every hook is declared.

Every hook takes keyword arguments: the run context ``ctx`` (a :class:`tricks.RunContext`)
plus the object it is about. A plugin implements a hook by defining a method of the same name
decorated with ``@tricks.hookimpl``; it may accept any subset of the declared arguments.

Combination rules, in pluggy's terms (a wrapper, ``@hookimpl(wrapper=True)``, is refused when its
plugin is registered for the chained and per-plugin hooks, whose implementations the relay calls
one by one):

* *firstresult* hooks stop at the first implementation that returns something other than
  ``None``. The core's own defaults are registered ``trylast``, so any plugin's result wins
  over them. Wrappers (``@hookimpl(wrapper=True)``) receive the result of the inner
  implementations from ``result = yield`` and return it, changed or replaced.
* *chained* hooks (``on_batch``) run every implementation in the resolved plugin order;
  each receives the previous one's output.
* *broadcast* hooks run every implementation in the resolved plugin order; return values are
  ignored.

Only ``tricks.hooks`` calls these hooks; the rest of the core goes through it.
"""

from __future__ import annotations

import pluggy

PROJECT = "tricks"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# The combination rule of every hook, read by tricks.hooks and checked by the docs test.
RULES = {
    "build_model": "firstresult",
    "configure_optimizer": "firstresult",
    "configure_schedule": "firstresult",
    "build_loss": "firstresult",
    "evaluate": "firstresult",
    "load_data": "firstresult",
    "make_loaders": "firstresult",
    "forward": "firstresult",
    "on_batch": "chained",
    "prepare_data": "chained",
    "prune": "per-plugin",
    "replay_structure": "per-plugin",
    "on_fit_start": "broadcast",
    "on_epoch_start": "broadcast",
    "on_evaluate_end": "broadcast",
    "on_epoch_end": "broadcast",
    "on_fit_end": "broadcast",
    "on_exception": "broadcast",
    "state_dict": "per-plugin",
    "load_state_dict": "per-plugin",
}


# --- the five hooks the product is known by ----------------------------------------------


@hookspec(firstresult=True)
def build_model(ctx):
    """Build the network to train.

    Fires: once, before training (and again when a run resumes).
    Parameters:
        ctx: the run context; ``ctx.core.model``, ``ctx.num_classes``, ``ctx.in_chans``
            and ``ctx.image_size`` describe what is needed.
    Returns: an ``nn.Module`` whose forward maps ``batch["input"]`` to the model output, or
        ``None`` to leave the choice to the next provider.
    The provider rule, one for every provider: return ``None`` when ``ctx.core.model`` is not a
        name this provider builds; raise ``TricksError`` only for a bad setting of a name it does
        build. The core's provider, last, refuses a name nobody built; a plugin of the run that
        provides the model (``provides: [model]``) but built nothing is refused by the core too.
    Combines: first non-None result wins; the core's provider (CIFAR ResNets and ``timm:NAME``)
        is registered last. Model surgery (zero-gamma, DropBlock insertion) is a wrapper
        (``wrapper=True``): ``model = yield``, change it, return it.
    """


@hookspec(firstresult=True)
def configure_optimizer(ctx, model):
    """Create the optimizer for ``model``.

    Fires: after the model is built, and again after any structural change (``prune``).
    Parameters:
        ctx: the run context; ``ctx.core`` holds ``lr``, ``momentum``, ``weight_decay``.
        model: the (unwrapped) model being trained.
    Returns: a ``torch.optim.Optimizer``, or ``None``.
    Combines: first non-None result wins (the core's default is SGD with Nesterov momentum);
        wrappers (``wrapper=True``) receive the optimizer and may change its parameter groups
        or learning rates (no-bias-decay, linear LR scaling) or replace it.
    """


@hookspec(firstresult=True)
def build_loss(ctx):
    """Create the training loss.

    Fires: once, before training.
    Parameters:
        ctx: the run context.
    Returns: a callable ``loss(output, batch) -> scalar tensor``. ``batch["target"]`` holds
        class indices (``int64``, shape ``[B]``) or soft targets (floating, shape ``[B, K]``).
    Combines: first non-None result is the base loss (the core's default is cross-entropy on
        hard or soft targets); wrappers (``wrapper=True``) receive it and return a wrapped loss
        (label smoothing, distillation).
    """


@hookspec
def on_batch(ctx, batch):
    """Transform a training batch before the forward pass.

    Fires: every training step, after the batch is on the device and the core's standard
        augmentation has run, before the forward pass.
    Parameters:
        ctx: the run context (``ctx.step``, ``ctx.epoch`` are current).
        batch: a mapping with at least ``input`` (float ``[B, C, H, W]``, normalized) and
            ``target`` (``int64 [B]`` or floating ``[B, K]`` soft targets). Its tensors are made
            new for every step and used by nothing else, so they may be written in place.
    Returns: the transformed mapping, or ``None`` when the batch was changed in place.
    Combines: chained: every implementation runs, in the resolved plugin order, each on the
        previous one's output.
    """


# --- tasks: what a task plugin (detection, ...) replaces -------------------------------------


@hookspec(firstresult=True)
def load_data(ctx):
    """Load the run's data set.

    Fires: once per run (again on resume), first of all; ``ctx.num_classes``, ``ctx.in_chans``,
        ``ctx.image_size`` and ``ctx.train_size`` are 0 and ``ctx.data`` is ``None`` until it returns.
    Parameters:
        ctx: the run context; ``ctx.core.task``, ``ctx.core.dataset``, ``ctx.core.data_dir`` and
            the limits name what to load.
    Returns: a :class:`tricks.data.Data` (the core's classification data), or a task's own data
        object with at least ``name``, ``num_classes``, ``in_chans``, ``image_size``,
        ``train_size``, ``notes`` (a list of strings for the log) and ``metric`` (the validation
        metric a run is judged by, higher is better: ``val_acc`` for classification); or
        ``None`` to leave the data set to the next provider. A task plugin returns ``None`` when
        ``ctx.core.task`` is not its task. Never downloads without ``ctx.core.download``.
    Combines: first non-None result wins; the core's provider (the classification data sets of
        ``--dataset``) is registered last.
    """


@hookspec(firstresult=True)
def make_loaders(ctx, data):
    """Build the training and validation loaders of the data set ``load_data`` gave.

    Fires: once per run, after ``prepare_data``, before the model is built.
    Parameters:
        ctx: the run context (``ctx.device``, ``ctx.rank``, ``ctx.world_size``).
        data: what ``load_data`` (then ``prepare_data``) returned.
    Returns: ``(train_loader, val_loader)``: iterables of batches (mappings with at least
        ``input``, a float ``[B, C, H, W]`` tensor on the device), each with ``len()`` (batches
        per epoch) and ``set_epoch(epoch)``; the training loader takes this process's shard of
        every epoch, the validation loader its shard of the validation set. Or ``None``.
    Combines: first non-None result wins; the core's provider (device-resident tensors,
        batch-wise augmentation on the device) is registered last.
    """


@hookspec(firstresult=True)
def forward(ctx, model, batch):
    """Run the model on a training batch.

    Fires: every training step, after ``on_batch``, under the run's autocast; only when a plugin
        of the run implements it (otherwise the core calls ``model(batch["input"])`` itself).
    Parameters:
        ctx: the run context.
        model: the model being trained (wrapped for data parallelism when there are processes).
        batch: the batch ``on_batch`` returned.
    Returns: the output the loss (``build_loss``) receives: a torchvision detector's dict of
        losses for detection; or ``None``.
    Combines: first non-None result wins; the core's default is ``model(batch["input"])``.
    """


@hookspec
def prepare_data(ctx, data):
    """Change the data set before the loaders and the model are built: relabel, drop classes,
    resample the training split.

    Fires: once per run (again on resume), after the data set is loaded and checked, before the
        loaders, the model and everything else; ``ctx.num_classes``, ``ctx.in_chans`` and
        ``ctx.image_size`` are those of the loaded data, ``ctx.model`` is ``None`` and
        ``ctx.steps_per_epoch`` is 0.
    Parameters:
        ctx: the run context.
        data: a :class:`tricks.data.Data`: the splits as ``uint8`` tensors on the host
            (``data.train.x/y``, ``data.val.x/y``), ``num_classes``, the augmentation settings and
            ``train_sampler`` (which examples an epoch visits; see :class:`tricks.data.Sampler`).
    Returns: a new ``Data`` (``dataclasses.replace(data, ...)``; never change the given one's
        tensors in place: a job may keep them for its next run), or ``None`` to leave it. The
        model is then built for the returned ``num_classes``. It must depend only on the run's
        settings, so that a resumed run prepares the same data.
    Combines: chained: every implementation runs, in the resolved plugin order, each on the
        previous one's output.
    """


@hookspec
def prune(ctx, model):
    """Change the structure of the model (remove channels, layers, ...).

    Fires: at the end of every epoch, after evaluation and before the checkpoint; a pruning
        plugin decides from its settings and ``ctx.epoch`` whether to act.
    Parameters:
        ctx: the run context.
        model: the (unwrapped) model, changed in place.
    Returns: ``None`` when nothing changed; otherwise the change *as data* (dicts, lists,
        strings, numbers, booleans, tensors: no objects), enough for ``replay_structure`` to
        make the same change on a freshly built model. A checkpoint holds data only, never a
        pickled model, so this record is how a changed model is rebuilt.
    Combines: per plugin: every implementation runs; each change is recorded with its plugin's
        name, epoch and settings. The core then checks that replaying every record on a fresh
        model gives the model's shapes, rebuilds the optimizer and schedule for the new shapes,
        re-applies its model wrappers (DDP), and checkpoints.
    """


@hookspec
def replay_structure(ctx, model, change):
    """Make again, on a freshly built model, a structural change this plugin made in ``prune``.

    Fires: whenever a model is rebuilt from a checkpoint whose structure this plugin changed
        (``--resume``, ``core.init_from``, ``RunDir.build_model``, a distillation teacher), once
        per recorded change, in the order the changes were made, before the weights are loaded;
        and once after each ``prune`` that changed something, on a fresh model, to check the
        record.
    Parameters:
        ctx: the run context.
        model: the freshly built (unwrapped) model, on the CPU, changed in place. Only its
            shapes matter: the trained weights are loaded afterwards.
        change: exactly what this plugin's ``prune`` returned.
    Combines: per plugin: only the plugin that recorded the change is called. A plugin whose
        ``prune`` returns a change must implement it.
    """


# --- schedule ------------------------------------------------------------------------------


@hookspec(firstresult=True)
def configure_schedule(ctx, optimizer):
    """Provide the learning-rate schedule.

    Fires: after ``configure_optimizer`` (and again whenever the optimizer is rebuilt).
    Parameters:
        ctx: the run context (``ctx.total_steps``, ``ctx.steps_per_epoch``).
        optimizer: the optimizer whose learning rates the schedule scales.
    Returns: a function ``f(step, total_steps, base_lr) -> float``: the learning rate of a
        parameter group whose base learning rate is ``base_lr``, at optimizer step ``step``
        (0-based) of ``total_steps``. The core applies it to every group before each step.
    Combines: first non-None result wins (the core's default is the constant base rate); wrappers
        (``wrapper=True``) receive the schedule in force and return a new one (warmup).
    """


# --- evaluation -----------------------------------------------------------------------------


@hookspec(firstresult=True)
def evaluate(ctx, model, loader):
    """Evaluate the model on the validation data.

    Fires: at the end of every epoch.
    Parameters:
        ctx: the run context.
        model: the model, already in eval mode, under ``torch.no_grad``.
        loader: an iterable of validation batches (mappings like ``on_batch``'s), this
            process's shard of the validation set.
    Returns: a dict of summed statistics with an ``n`` entry (the number of examples); the
        core reduces them across processes and divides every entry by ``n`` (the default
        returns ``loss`` and ``acc`` (the summed loss and the number of correct predictions), reported as ``val_loss`` and ``val_acc``).
        Metrics that are not sums (a detector's mAP) go in a ``reduced`` entry: a dict of
        figures already computed over the whole validation set, the same on every process
        (the plugin gathers what it needs), reported as ``val_<key>`` unchanged.
    Combines: first non-None result wins; a task plugin brings its own metrics.
    """


@hookspec
def on_evaluate_end(ctx, metrics):
    """Observe or extend the validation metrics.

    Fires: after ``evaluate``, once the metrics are reduced across processes.
    Parameters:
        ctx: the run context.
        metrics: the dict of reduced validation metrics (``val_loss``, ``val_acc``, ...);
            an implementation may add entries.
    Combines: broadcast, in the resolved plugin order; return values are ignored.
    """


# --- lifecycle ------------------------------------------------------------------------------


@hookspec
def on_fit_start(ctx):
    """Prepare for training.

    Fires: once, after the model, optimizer, schedule and loss exist and any checkpoint has
        been restored, before the first epoch.
    Parameters:
        ctx: the run context (``ctx.model``, ``ctx.optimizer``, ``ctx.start_epoch``).
    Combines: broadcast, in the resolved plugin order.
    """


@hookspec
def on_epoch_start(ctx, epoch):
    """Start an epoch.

    Fires: at the start of every training epoch.
    Parameters:
        ctx: the run context.
        epoch: the epoch about to run (0-based).
    Combines: broadcast, in the resolved plugin order.
    """


@hookspec
def on_epoch_end(ctx, epoch, metrics):
    """Finish an epoch.

    Fires: at the end of every epoch, after evaluation and pruning, before the metrics are
        written and the checkpoint is saved.
    Parameters:
        ctx: the run context.
        epoch: the epoch that ran (0-based).
        metrics: the epoch's metrics row; an implementation may add entries, which are written
            to ``metrics.jsonl``.
    Combines: broadcast, in the resolved plugin order.
    """


@hookspec
def on_fit_end(ctx, summary):
    """Finish training.

    Fires: once, after the last epoch's ``on_epoch_end`` and before its checkpoint, which holds
        the summary (``summary.json`` is written from it).
    Parameters:
        ctx: the run context.
        summary: the run summary dict; an implementation may add entries.
    Combines: broadcast, in the resolved plugin order.
    """


@hookspec
def on_exception(ctx, error):
    """React to a failed run.

    Fires: when training stops with an exception (the exception is re-raised afterwards).
    Parameters:
        ctx: the run context.
        error: the exception.
    Combines: broadcast, in the resolved plugin order; errors inside it are not raised.
    """


# --- plugin state in checkpoints ------------------------------------------------------------


@hookspec
def state_dict(ctx):
    """Return this plugin's state, to be saved in the checkpoint.

    Fires: every time a checkpoint is written.
    Parameters:
        ctx: the run context.
    Returns: data (tensors, numbers, strings, and lists and dicts of them: what
        ``torch.load(weights_only=True)`` reads back), or ``None`` for no state. Anything else
        is refused when the checkpoint is saved, naming the plugin.
    Combines: per plugin: the core calls each implementation and stores its result under
        the plugin's name.
    """


@hookspec
def load_state_dict(ctx, state):
    """Restore this plugin's state from a checkpoint.

    Fires: when a run resumes, after the model, optimizer and schedule are rebuilt.
    Parameters:
        ctx: the run context.
        state: exactly what this plugin's ``state_dict`` returned when the checkpoint was saved.
    Combines: per plugin: each implementation receives only its own state.
    """
