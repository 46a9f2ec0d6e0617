"""The detection task end to end, on the bundled 8x8 digits: the box-aware augmentation (flip,
zoom) keeps every box on its ink, the batches' form, every detector kind on a tiny canvas, the
CLI's run directory, learning, the refusals, a stopped (and a killed) run resumed to the
uninterrupted result, and a COCO folder written by ``write_coco`` trained on."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

import tricks
from tricks.testing import CLOCK_COLUMNS, tiny_run
from tricks_detection.data import DetectionData, DetectionLoader, DetectionSplit, flip_boxes, zoom
from tricks_detection.mnist_detection import EMBEDDED, coco_dict, generate, write_coco

from conftest import run_cli
from processes import (ONE_THREAD, StopAtEpoch, cli_in_process, finish_killed, one_line_error,
                       one_torch_thread, start_script)

INK = 40  # a pixel brighter than this (0-255) is ink
CANVAS = 32
NUM_CLASSES = 10
# A detection run that finishes in seconds on one core: 32 canvases of 32 px, batches of 16.
SMALL = ["detection.train_images=32", "detection.val_images=8", f"detection.canvas={CANVAS}", "detection.fpn_channels=32"]
CORE = dict(task="detection", dataset="digits_detection", batch_size=16, lr=0.01, train_limit=None, val_limit=None)
CLI_SMALL = ["--task", "detection", "--dataset", "digits_detection", "--batch-size", "16", "--lr", "0.01",
             *(arg for s in SMALL for arg in ("--set", s))]


# --- helpers -----------------------------------------------------------------------------------------


def make_data(dataset, flip: bool, jitter: tuple[float, float]) -> DetectionData:
    """The DetectionData that load_data builds from these training canvases (validation: the same set)."""
    x = dataset.images.float()
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(max(v, 1e-3) for v in x.std(dim=(0, 2, 3)).tolist())
    split = DetectionSplit.from_set(dataset)
    return DetectionData("digits_detection", split, split, list(dataset.categories), dataset.images.shape[1],
                         dataset.images.shape[-1], mean, std, flip, jitter, {})


def unnormalize(data: DetectionData, x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(data.std).view(1, -1, 1, 1) + torch.tensor(data.mean).view(1, -1, 1, 1)


def inside(boxes: torch.Tensor, size: int, margin: float) -> torch.Tensor:
    """bool [H, W]: the pixels whose centres lie in any of ``boxes`` grown by ``margin`` pixels."""
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    mask = torch.zeros(size, size, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.tolist():
        cols = (centres > x1 - margin) & (centres < x2 + margin)
        rows = (centres > y1 - margin) & (centres < y2 + margin)
        mask |= rows[:, None] & cols[None, :]
    return mask


def stopping(base):
    """``base`` (an AtEpoch plugin) made to join detection runs (ad-hoc plugins are classification-only)."""
    return type(f"Detection{base.__name__}", (base,), {"tasks": ("detection",)})


# --- augmentation ------------------------------------------------------------------------------------


def test_flipped_and_zoomed_training_batches_keep_every_box_on_its_ink():
    source = generate(EMBEDDED, train=True, count=32, canvas=CANVAS, scale=(2, 4), seed=0)
    data = make_data(source, flip=True, jitter=(0.7, 1.3))
    loader = DetectionLoader(data.train, data, batch_size=16, train=True, seed=0)
    torch.manual_seed(0)
    checked = whole = changed = 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            images = unnormalize(data, batch["input"])
            for image, target, image_id in zip(images, batch["target"], batch["image_id"].tolist()):
                ink = image[0] > INK
                original = source.images[image_id - 1, 0].float()
                changed += not torch.allclose(image[0], original, atol=0.5)
                boxes = target["boxes"]
                for box in boxes:  # every box holds ink
                    assert ink[inside(box[None], CANVAS, 0.0)].any(), (image_id, box.tolist())
                # every ink pixel lies on a box, unless a box went off the canvas (it is dropped, its
                # ink that is left stays)
                if len(boxes) == len(source.boxes[image_id - 1]):
                    stray = ink & ~inside(boxes, CANVAS, 1.5)
                    assert not stray.any(), (image_id, stray.nonzero().tolist(), boxes.tolist())
                    whole += 1
                checked += 1
    assert checked == 3 * 32
    assert whole >= checked * 3 // 4  # the check above ran on most images
    assert changed >= checked * 3 // 4  # and the images were really flipped or zoomed


def test_flip_boxes_mirrors_boxes_with_the_image():
    boxes = torch.tensor([[1.0, 2.0, 5.0, 9.0], [0.0, 0.0, 32.0, 32.0], [30.5, 4.0, 31.0, 7.25]])
    assert torch.equal(flip_boxes(flip_boxes(boxes, 32), 32), boxes)
    assert torch.equal(flip_boxes(boxes, 32)[0], torch.tensor([27.0, 2.0, 31.0, 9.0]))
    image = torch.zeros(1, 1, 16, 16)
    for row, col in [(3, 0), (7, 5), (15, 15)]:
        image.zero_()
        image[0, 0, row, col] = 255
        box = torch.tensor([[col, row, col + 1, row + 1]], dtype=torch.float32)
        flipped, moved = image.flip(3), flip_boxes(box, 16)
        assert inside(moved, 16, 0.0)[flipped[0, 0] > 0].all() and (flipped[0, 0] > 0).sum() == 1


def test_zoom_is_the_identity_at_scale_1_and_moves_a_point_p_to_s_p_plus_t():
    images = generate(EMBEDDED, train=True, count=3, canvas=CANVAS, scale=(2, 4), seed=1).images.float()
    boxes = torch.tensor([[[1.0, 2.0, 10.0, 12.0]], [[0.0, 0.0, 32.0, 32.0]], [[5.0, 5.0, 6.0, 7.0]]])
    out, moved = zoom(images, boxes, torch.ones(3), torch.zeros(3, 2))
    assert torch.allclose(out, images, atol=1e-3) and torch.equal(moved, boxes)

    # one bright pixel per image, each image with its own scale and shift (x, y)
    points = torch.tensor([[10, 4], [20, 25], [7, 16]])  # (col, row)
    scale = torch.tensor([1.25, 0.8, 1.0])
    shift = torch.tensor([[-3.5, 2.25], [4.0, -1.5], [2.5, 3.0]])
    dots = torch.zeros(3, 1, CANVAS, CANVAS)
    for i, (col, row) in enumerate(points.tolist()):
        dots[i, 0, row, col] = 255
    pixel_boxes = torch.cat([points, points + 1], dim=1).float()[:, None, :]
    out, moved = zoom(dots, pixel_boxes, scale, shift)
    assert torch.allclose(moved, pixel_boxes * scale[:, None, None] + shift.repeat(1, 2)[:, None, :])
    grid = torch.arange(CANVAS, dtype=torch.float32) + 0.5  # pixel centres
    for i in range(3):
        weight = out[i, 0]
        assert weight.sum() > 0
        centre = torch.stack([(weight.sum(0) * grid).sum(), (weight.sum(1) * grid).sum()]) / weight.sum()
        want = scale[i] * (points[i].float() + 0.5) + shift[i]
        assert (centre - want).abs().max() < 1.0, (i, centre.tolist(), want.tolist())


# --- batches -----------------------------------------------------------------------------------------


def test_batches_hold_per_image_targets_and_validation_is_every_image_once_unaugmented():
    source = generate(EMBEDDED, train=True, count=20, canvas=CANVAS, scale=(2, 4), seed=0)
    data = make_data(source, flip=True, jitter=(0.7, 1.3))
    torch.manual_seed(0)
    train = DetectionLoader(data.train, data, batch_size=8, train=True, seed=0)
    assert len(train) == 2  # the last partial training batch is dropped
    for batch in train:
        assert batch["input"].shape == (8, 1, CANVAS, CANVAS) and batch["input"].dtype == torch.float32
        assert isinstance(batch["target"], list) and len(batch["target"]) == 8
        assert batch["image_id"].dtype == torch.int64
        for target in batch["target"]:
            boxes, labels = target["boxes"], target["labels"]
            assert boxes.dtype == torch.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
            assert labels.dtype == torch.int64 and labels.shape == (len(boxes),)
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert (boxes >= 0).all() and (boxes <= CANVAS).all()
            assert ((labels >= 1) & (labels <= NUM_CLASSES)).all()  # 0 is the background, never a target

    val = DetectionLoader(data.val, data, batch_size=8, train=False, seed=0)
    assert len(val) == 3  # 8 + 8 + 4: every image
    first, second = list(val), list(val)
    ids = torch.cat([b["image_id"] for b in first])
    assert sorted(ids.tolist()) == list(range(1, 21))
    for a, b in zip(first, second):
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["image_id"], b["image_id"])
        for image, target, image_id in zip(unnormalize(data, a["input"]), a["target"], a["image_id"].tolist()):
            assert torch.allclose(image, source.images[image_id - 1].float(), atol=1e-3)  # not flipped nor zoomed
            assert torch.equal(target["boxes"], source.boxes[image_id - 1])
            assert torch.equal(target["labels"], source.labels[image_id - 1] + 1)


# --- detectors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["fcos:resnet8", "retinanet:resnet8", "ssd:resnet8", "ssdlite:resnet8", "fasterrcnn:resnet8",
                                   "retinanet:regnetx_200mf"])  # the last: a backbone from the regnet plugin
def test_each_detector_trains_a_step_and_is_evaluated(tmp_path, model):
    run = tiny_run(plugins=["detection"], set=[*SMALL, "detection.draw=0"], out=tmp_path / "run", model=model,
                   curves=False, **CORE)
    [row] = run.metrics()
    assert row["step"] == 2
    assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0
    for key in ("val_map", "val_map_50", "val_map_75"):
        assert isinstance(row[key], float) and 0.0 <= row[key] <= 1.0, (key, row[key])
    summary = run.summary()
    assert summary["metric"] == "val_map" and summary["final_val_map"] == row["val_map"]
    assert summary["model"] == model and summary["params"] > 0


def test_the_cli_run_directory(tmp_path):
    out = tmp_path / "run"
    done = run_cli("run", *CLI_SMALL, "--model", "fcos:resnet8", "--epochs", "1", "--set", "detection.draw=4",
                   "--out", str(out), env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    assert "val_map" in done.stdout
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "curves.png", "detections.png"):
        assert (out / name).is_file(), name
    with Image.open(out / "detections.png") as picture:
        picture.verify()
    with Image.open(out / "detections.png") as picture:
        assert picture.format == "PNG" and min(picture.size) >= CANVAS
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["metric"] == "val_map"
    assert summary["detections_png"] == str(out / "detections.png")
    assert tricks.RunDir(out).config()["core"]["task"] == "detection"


@pytest.mark.slow  # 12 epochs: about 25 s
def test_fcos_learns_to_find_one_digit(tmp_path):
    sets = ["detection.train_images=200", "detection.val_images=50", f"detection.canvas={CANVAS}",
            "detection.fpn_channels=32", "detection.digits=[1,1]", "detection.draw=0"]
    run = tiny_run(plugins=["detection"], set=sets, out=tmp_path / "run", model="fcos:resnet8", epochs=12,
                   curves=False, **CORE)
    rows = run.metrics()
    assert len(rows) == 12
    first, last = rows[0]["val_map_50"], rows[-1]["val_map_50"]
    assert last > 0.5 and last > first + 0.3, [r["val_map_50"] for r in rows]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


# --- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragments", [
    (["--task", "detection", "--plugins", "mixup", "--model", "fcos:resnet8"], ["mixup", "detection"]),
    (["--task", "detektion"], ["detektion", "did you mean detection"]),
    (["--model", "fcos:resnet8", "--dataset", "digits"], ["--task detection"]),
    (["--task", "detection", "--model", "resnet8"], ["needs a detector", "resnet8"]),
    (["--task", "detection", "--model", "fcos:resnet8", "--dataset", "cifar10"], ["cifar10", "--dataset"]),
    (["--task", "detection", "--model", "fcos:resnet8", "--dataset", "mnist_detection"], ["mnist_detection", "--data-dir"]),
    (["--task", "detection", "--model", "fcos:resnet8", "--dataset", "coco", "--data-dir", "NONEXISTENT"],
     ["NONEXISTENT", "instances_train.json"]),
    (["--task", "detection", "--plugins", "kd", "--model", "fcos:resnet8"], ["kd", "detection", "anchors"]),
], ids=["mixup", "misspelt-task", "detector-without-task", "classifier-as-detector", "cifar10", "mnist-no-dir", "coco-no-dir",
        "kd"])
def test_a_refusal_is_one_line_with_status_2(tmp_path, args, fragments):
    dataset = [] if "--dataset" in args else ["--dataset", "digits_detection"]
    sets = [arg for s in SMALL for arg in ("--set", s)] if "--task" in args and "detektion" not in args else []
    code, _, stderr = cli_in_process("run", *args, *dataset, *sets, "--batch-size", "16", "--epochs", "1",
                                     "--out", str(tmp_path / "run"))
    one_line_error(code, stderr, *fragments)


# --- resume ------------------------------------------------------------------------------------------


def assert_same_run(got: tricks.RunDir, want: tricks.RunDir) -> None:
    """The same metrics rows (the clock's columns left out) and the same final weights."""
    got_rows, want_rows = got.metrics(), want.metrics()
    assert [r["epoch"] for r in got_rows] == [r["epoch"] for r in want_rows] == [1, 2]
    for a, b in zip(got_rows, want_rows):
        assert {k: v for k, v in a.items() if k not in CLOCK_COLUMNS} == {k: v for k, v in b.items() if k not in CLOCK_COLUMNS}
    a, b = got.load_checkpoint()["model"], want.load_checkpoint()["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert got.summary()["final_val_map"] == want.summary()["final_val_map"]


def test_a_detection_run_stopped_after_epoch_1_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    sets = [*SMALL, "detection.draw=0"]
    want = tiny_run(plugins=["detection"], set=sets, out=tmp_path / "whole", model="fcos:resnet8", epochs=2,
                    curves=False, **CORE)
    with pytest.raises(tricks.PluginHookError, match="stopped as epoch 1 starts"):
        tiny_run(plugins=["detection", stopping(StopAtEpoch)(1)], set=sets, out=tmp_path / "stopped",
                 model="fcos:resnet8", epochs=2, curves=False, **CORE)
    stopped = tricks.RunDir(tmp_path / "stopped")
    assert len(stopped.metrics()) == 1 and stopped.load_checkpoint()["epoch"] == 1
    tricks.run(resume=stopped.path)
    assert_same_run(stopped, want)


@pytest.mark.slow
def test_a_detection_run_killed_after_epoch_1_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    killed_dir, reference = tmp_path / "killed", tmp_path / "uninterrupted"
    sets = [*SMALL, "detection.draw=0"]
    core = dict(model="fcos:resnet8", epochs=2, curves=False, device="cpu", **CORE)
    killed = start_script(f"""
        import tricks
        from processes import KillAtEpoch
        class Kill(KillAtEpoch):
            tasks = ("detection",)
        tricks.run(plugins=["detection", Kill(1)], set={sets!r}, out={str(killed_dir)!r}, **{core!r})
    """)
    with one_torch_thread():
        tricks.run(plugins=["detection"], set=sets, out=reference, **core)
    finish_killed(killed)
    assert tricks.RunDir(killed_dir).load_checkpoint()["epoch"] == 1
    assert tricks.RunDir(killed_dir).summary() is None
    with one_torch_thread():
        tricks.run(resume=killed_dir)
    assert_same_run(tricks.RunDir(killed_dir), tricks.RunDir(reference))



# --- COCO --------------------------------------------------------------------------------------------


class Capture(tricks.Plugin):
    """An ad-hoc plugin that keeps the run's data (its validation ground truth) at the end of the fit."""

    name = "capture"
    tasks = ("detection",)

    def __init__(self):
        super().__init__()
        self.data = None

    @tricks.hookimpl
    def on_fit_end(self, ctx, summary):
        self.data = ctx.data


def test_a_coco_folder_written_by_write_coco_trains_and_its_validation_truth_is_what_was_written(tmp_path):
    folder = tmp_path / "coco"
    args = dict(canvas=CANVAS, scale=(2, 4), seed=3)
    train, val = generate(EMBEDDED, train=True, count=32, **args), generate(EMBEDDED, train=False, count=8, **args)
    write_coco(train, folder, "train")
    write_coco(val, folder, "val")
    capture = Capture()
    run = tiny_run(plugins=["detection", capture], set=["detection.fpn_channels=32", "detection.draw=0"],
                   out=tmp_path / "run", model="fcos:resnet8", curves=False,
                   **{**CORE, "dataset": "coco", "data_dir": str(folder)})
    [row] = run.metrics()
    assert row["step"] == 2 and math.isfinite(row["train_loss"]) and 0.0 <= row["val_map"] <= 1.0
    data = capture.data
    assert data.flip  # a COCO set is flipped by default
    assert torch.equal(data.val.images.cpu(), val.images) and data.val.image_ids.tolist() == val.image_ids
    written = json.loads((folder / "annotations" / "instances_val.json").read_text())
    assert written == coco_dict(val)
    truth = data.ground_truth

    def annotations(coco):
        return sorted((a["image_id"], a["category_id"], tuple(a["bbox"]), a["area"], a["iscrowd"]) for a in coco["annotations"])

    assert annotations(truth) == annotations(written)
    assert [(c["id"], c["name"]) for c in truth["categories"]] == [(c["id"], c["name"]) for c in written["categories"]]
    assert sorted((i["id"], i["width"], i["height"]) for i in truth["images"]) == \
        sorted((i["id"], i["width"], i["height"]) for i in written["images"])


# --- deep backbones, small canvases; backbones of other plugins ------------------------------------


def test_fcos_on_a_deep_backbone_at_a_small_canvas_trains(tmp_path):
    """FCOS's group norm takes 8 channels a group: a 1x1 top level (P7 of a stride-32 backbone on a
    32 px canvas) with a 32-channel pyramid still normalizes (32 groups of one channel could not)."""
    code, _, stderr = cli_in_process("run", *CLI_SMALL, "--model", "fcos:resnet18", "--epochs", "1",
                                     "--set", "detection.draw=0", "--no-curves", "--out", str(tmp_path / "run"))
    assert code == 0, stderr
    assert math.isfinite(tricks.RunDir(tmp_path / "run").metrics()[0]["train_loss"])


def test_a_resnet_d_backbone_comes_from_resnet_tweaks(tmp_path):
    """``fcos:resnet20-d``: the core's depth with the resnet_tweaks plugin's variant D (average-pool
    shortcut), built by that plugin."""
    from tricks.testing import make_ctx
    from tricks_detection.models import build_backbone
    from tricks_resnet_tweaks import create_resnet

    ctx = make_ctx(model="fcos:resnet20-d", task="detection", num_classes=10, in_chans=1, image_size=32)
    built = build_backbone(ctx, "resnet20-d")
    want = create_resnet(20, "D", "cifar", 10, 1)
    assert type(built) is type(want)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in want.state_dict().items()}
    run = tiny_run(plugins=["detection"], set=[*SMALL, "detection.draw=0"], out=tmp_path / "run",
                   model="fcos:resnet20-d", curves=False, **CORE)
    assert math.isfinite(run.metrics()[0]["train_loss"])


# --- several processes -------------------------------------------------------------------------------


@pytest.mark.slow  # two processes train end to end
def test_two_processes_report_the_map_of_the_whole_validation_set(tmp_path):
    """``torchrun --nproc-per-node 2``: each process evaluates its shard of the validation images,
    the predictions are gathered, and both report the mAP of the whole set; it equals the mAP of
    the checkpointed detector evaluated here in one process."""
    import sys

    from processes import finish, start
    from tricks.testing import make_ctx
    from tricks_detection import Detection

    out = tmp_path / "run"
    proc = finish(start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "tricks.cli.main", "run", *CLI_SMALL, "--model", "fcos:resnet8", "--epochs", "4",
                         "--set", "detection.train_images=128", "--set", "detection.digits=[1,1]",
                         "--device", "cpu", "--set", "detection.draw=0", "--set", "detection.val_images=9",
                         "--no-curves", "--json", "--out", str(out)], env={"TRICKS_DIST_BACKEND": "gloo"}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tricks.RunDir(out)
    row = run.metrics()[-1]
    assert run.summary()["world_size"] == 2
    cfg = run.run_config()
    ctx = make_ctx(plugins=cfg.plugins, set=[f"detection.{k}={v}" for k, v in cfg.settings["detection"].model_dump().items()
                                             if v is not None],
                   **{k: v for k, v in cfg.core.model_dump().items() if k in ("task", "dataset", "model", "batch_size", "seed")})
    plugin = Detection(cfg.settings["detection"])
    data = plugin.load_data(ctx)
    ctx.data = data
    model = run.build_model()
    model.eval()
    _, val_loader = plugin.make_loaders(ctx, data)
    with torch.no_grad():
        figures = plugin.evaluate(ctx, model, val_loader)
    assert figures["n"] == 9  # every validation image, in one process
    assert row["val_map_50"] > 0  # a detector that finds something: the comparison can fail
    assert abs(figures["reduced"]["map"] - row["val_map"]) < 1e-9
    assert abs(figures["reduced"]["map_50"] - row["val_map_50"]) < 1e-9
