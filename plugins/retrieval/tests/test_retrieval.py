"""The retrieval task: the class-balanced sampler (m images of each class per batch, from the seed
and the epoch, per process), Recall@K and MAP@R on hand-made embeddings and against a brute-force
count, the class split, the gathering of the processes' shares, the plugin contract (with an exact
resume), a run with the baseline loss, an ablation of circle_loss against it (its tables and tricks compare by MAP@R), and the refusals."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import tricks
from tricks.compare import compare
from tricks.data import ShardedBatches
from tricks.testing import check_plugin, make_ctx, tiny_run
from tricks_retrieval import ClassBatchSampler, Retrieval, classes_per_batch, gather, retrieval_metrics

from conftest import read_jsonl
from processes import cli_in_process, one_line_error

TINY = ["--model", "resnet8", "--dataset", "digits", "--batch-size", "32", "--train-limit", "256", "--val-limit", "128"]




# --- the sampler ---------------------------------------------------------------------------------


def labels_of(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])[torch.randperm(sum(counts), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("world", [1, 2])
def test_each_batch_of_each_process_holds_m_images_of_each_of_its_classes(world):
    labels = labels_of([30, 25, 3, 40, 12])  # class 2 has fewer images than m
    per, m, steps = 12, 4, 6
    sampler = ClassBatchSampler(labels, per, m, steps, world)
    assert len(sampler) == steps * per * world
    for rank in range(world):
        batches = list(ShardedBatches(len(labels), per, True, seed=3, rank=rank, world=world, sampler=sampler).index_batches())
        assert len(batches) == steps
        for batch in batches:
            classes, counts = torch.unique(labels[batch], return_counts=True)
            assert len(classes) == per // m and (counts == m).all(), (labels[batch], counts)


def test_the_order_depends_on_the_seed_and_the_epoch_only():
    labels = labels_of([20, 20, 20, 20])
    a, b = ClassBatchSampler(labels, 8, 2, 5), ClassBatchSampler(labels.clone(), 8, 2, 5)
    assert torch.equal(a.order(1, 0), b.order(1, 0))  # a resumed run draws the same epoch
    assert not torch.equal(a.order(1, 0), a.order(1, 1))
    assert not torch.equal(a.order(1, 0), a.order(2, 0))


def test_a_class_gives_every_image_once_before_any_twice():
    labels = labels_of([10, 10, 10])
    sampler = ClassBatchSampler(labels, 4, 2, 30)
    used = torch.bincount(sampler.order(0, 0), minlength=len(labels))
    for c in range(3):
        mine = used[labels == c]
        assert mine.max() - mine.min() <= 1, mine


def test_classes_per_batch_is_the_most_that_split_the_batch_evenly():
    assert classes_per_batch(32, 5) == 4
    assert classes_per_batch(30, 5) == 5
    assert classes_per_batch(64, 100) == 32  # groups of 2
    assert classes_per_batch(7, 5) is None
    with pytest.raises(ValueError, match="needs 8 classes"):
        ClassBatchSampler(labels_of([5, 5]), 16, 2, 1)


# --- the metrics ---------------------------------------------------------------------------------


def on_circle(degrees: list[float]) -> torch.Tensor:
    angle = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([angle.cos(), angle.sin()], 1).float()


def test_a_perfect_embedding_scores_one():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat_interleave(4)
    centres = torch.eye(8)[:5] * 10
    x = centres[labels] + 0.1 * torch.randn(20, 8, generator=g)
    found = retrieval_metrics(x, labels)
    assert found == {"recall_at_1": 1.0, "recall_at_2": 1.0, "recall_at_4": 1.0, "recall_at_8": 1.0,
                     "map_at_r": 1.0, "precision_at_1": 1.0}


def test_a_hand_made_embedding_scores_what_was_counted_by_hand():
    # a at 0, 10, 50 degrees; b at 22, 70, 80. Nearest neighbours (labels) and AP@R (R = 2):
    #   a0: a b a ..  hit at 1, AP@R 1/2      a1: a b a ..  hit at 1, AP@R 1/2
    #   b0: a a a b   hit at 4, AP@R 0        a2: b b b a   hit at 4, AP@R 0
    #   b1: b a b ..  hit at 1, AP@R 1/2      b2: b a b ..  hit at 1, AP@R 1/2
    x = on_circle([0, 10, 50, 22, 70, 80])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    found = retrieval_metrics(x, labels, ks=(1, 2, 4))
    assert found["recall_at_1"] == pytest.approx(4 / 6)
    assert found["recall_at_2"] == pytest.approx(4 / 6)
    assert found["recall_at_4"] == pytest.approx(1.0)
    assert found["map_at_r"] == pytest.approx(2 / 6)
    assert found["precision_at_1"] == pytest.approx(found["recall_at_1"])


def brute_force(x: torch.Tensor, labels: torch.Tensor, ks) -> dict[str, float]:
    """Recall@K and MAP@R by sorting every query's cosines, one query at a time."""
    x = torch.nn.functional.normalize(x.double(), dim=1)
    recall = {k: 0.0 for k in ks}
    ap = []
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        order = sorted(others, key=lambda j: -float(x[i] @ x[j]))
        same = [bool(labels[j] == labels[i]) for j in order]
        r = sum(same)
        for k in ks:
            recall[k] += any(same[:k])
        hits, total = 0, 0.0
        for rank, hit in enumerate(same[:r], 1):
            hits += hit
            total += hits / rank if hit else 0.0
        ap.append(total / r)
    return {**{f"recall_at_{k}": v / len(x) for k, v in recall.items()}, "map_at_r": sum(ap) / len(ap)}


def test_a_random_embedding_scores_what_a_brute_force_count_gives():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (40,), generator=g)
    x = torch.randn(40, 6, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, 6).float()
    want = brute_force(x, labels, (1, 2, 4, 8))
    found = retrieval_metrics(x, labels)
    for key, value in want.items():
        assert found[key] == pytest.approx(value, abs=1e-9), key
    assert 0.2 < found["map_at_r"] < 0.9  # a mixed case, neither perfect nor empty


def test_gather_puts_every_processs_share_back_in_the_set_order(monkeypatch):
    import torch.distributed as tdist

    embeddings, labels = torch.arange(14.0).view(7, 2), torch.arange(7)
    shards = [(embeddings[r::2], labels[r::2]) for r in range(2)]

    def fake_all_gather_object(parts, mine):
        parts[:] = [tuple(t.clone() for t in s) for s in shards]

    monkeypatch.setattr(tdist, "all_gather_object", fake_all_gather_object)
    e, y = gather(shards[1], rank=1, world=2)
    assert torch.equal(e, embeddings) and torch.equal(y, labels)


# --- the task ---------------------------------------------------------------------------------------


def test_load_data_keeps_the_training_classes_for_training_and_the_others_for_retrieval():
    ctx = make_ctx(plugins=["retrieval"], task="retrieval", set=["retrieval.train_classes=[1,3,5,7]",
                                                                   "retrieval.embedding_dim=16"])
    data = Retrieval(ctx.settings("retrieval")).load_data(ctx)
    assert set(data.train.y.tolist()) == {1, 3, 5, 7}
    assert set(data.val.y.tolist()) == {0, 2, 4, 6, 8, 9}
    assert data.num_classes == 16 and data.metric == "val_map_at_r"
    assert len(data.train.y) > 500 and data.train.x.shape[1:] == (1, 8, 8)
    assert Retrieval().load_data(make_ctx()) is None  # not its task


def test_a_plain_retrieval_run_trains_with_the_baseline_and_reports_the_retrieval_metrics(tmp_path):
    run = tiny_run(out=tmp_path / "run", task="retrieval", epochs=2, curves=False, set=["retrieval.loss=contrastive"])
    rows = run.metrics()
    assert [r["step"] for r in rows] == [4, 8]  # 141 training images of classes 0-4 in batches of 32
    for row in rows:
        # a contrastive loss on unit vectors (at most 2), not a cross-entropy over the embedding's 128 outputs
        assert 0 < row["train_loss"] <= 2
        for key in ("val_recall_at_1", "val_recall_at_2", "val_recall_at_4", "val_recall_at_8", "val_map_at_r"):
            assert 0.0 <= row[key] <= 1.0, key
        assert row["val_recall_at_1"] <= row["val_recall_at_2"] <= row["val_recall_at_4"] <= row["val_recall_at_8"]
    summary = run.summary()
    assert summary["metric"] == "val_map_at_r" and summary["final_val_map_at_r"] == rows[-1]["val_map_at_r"]
    assert run.config()["plugins"] == ["retrieval"]


def test_the_plugin_contract():
    check_plugin("retrieval", precisions=("fp32", "bf16"))


def test_an_ablation_of_circle_loss_against_the_baseline_tabulates_the_retrieval_metric(tmp_path):
    """The console script's entry point, called in this process (a fresh one only adds its start-up):
    the baseline (triplet) and circle_loss, one epoch each, and tables of MAP@R, not accuracy."""
    out = tmp_path / "ablation"
    code, stdout, stderr = cli_in_process("ablate", "--task", "retrieval", "--plugins", "circle_loss", *TINY,
                                          "--epochs", "1", "--set", "retrieval.per_class=8", "--out", str(out))
    assert code == 0, stderr
    assert "val_map_at_r" in stdout and "Traceback" not in stderr
    runs = sorted((out / "runs").glob("*/seed*"))
    assert len(runs) == 2
    finals = {}
    for run in runs:
        [row] = read_jsonl(run / "metrics.jsonl")
        assert row["step"] == 4 and math.isfinite(row["train_loss"]) and row["train_loss"] > 0
        for key in ("val_recall_at_1", "val_recall_at_2", "val_recall_at_4", "val_recall_at_8", "val_map_at_r"):
            assert 0.0 <= row[key] <= 1.0, key
        config = tricks.RunDir(run).config()
        assert config["core"]["task"] == "retrieval"
        finals[" ".join(sorted(config["plugins"]))] = row["val_map_at_r"]
    assert sorted(finals) == ["circle_loss retrieval", "retrieval"]
    with open(out / "results.csv") as f:
        results = {r["slug"]: r for r in csv.DictReader(f)}
    assert float(results["baseline"]["final_val_map_at_r"]) == pytest.approx(finals["retrieval"], abs=1e-4)
    assert "final_val_acc" not in results["baseline"]
    with open(out / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[1]["final_map_at_r"]) == pytest.approx(100 * finals["circle_loss retrieval"], abs=1e-2)
    assert float(table[1]["delta_final"]) == pytest.approx(100 * (finals["circle_loss retrieval"] - finals["retrieval"]),
                                                            abs=1e-2)
    assert "| final val_map_at_r (x100) |" in (out / "table.md").read_text()
    # tricks compare reads the same metric from the runs
    rows = compare([out], tmp_path / "cmp")
    assert sorted(r["final_val_map_at_r"] for r in rows) == pytest.approx(sorted(finals.values()))
    with open(tmp_path / "cmp" / "compare.csv") as f:
        assert next(csv.reader(f))[1:3] == ["final_val_map_at_r", "best_val_map_at_r"]


def test_the_baseline_loss_is_pytorch_metric_learnings_and_circle_loss_replaces_it():
    from pytorch_metric_learning import losses
    from tricks.builtin import CoreDefaults
    from tricks.hooks import Hooks
    from tricks_circle_loss import CircleLoss, pair_circle_loss

    x = torch.nn.functional.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    ctx = make_ctx(plugins=["circle_loss"], task="retrieval")

    def loss_of(*plugins):
        return Hooks([(p.name or "circle_loss", p) for p in plugins], core=CoreDefaults()).build_loss(ctx)(x, {"target": y})

    assert torch.equal(loss_of(Retrieval()), losses.TripletMarginLoss(margin=0.05)(x, y))
    contrastive = Retrieval(Retrieval.Settings(loss="contrastive"))
    assert torch.equal(loss_of(contrastive), losses.ContrastiveLoss()(x, y))
    assert torch.equal(loss_of(CircleLoss(), Retrieval()), pair_circle_loss(x, y))
    with pytest.raises(tricks.TricksError, match="one integer label per image"):
        Hooks([("retrieval", Retrieval())], core=CoreDefaults()).build_loss(ctx)(x, {"target": torch.rand(8, 4)})


def test_circle_loss_composes_with_cosine_and_warmup(tmp_path):
    """cosine and warmup list the retrieval task in the registry: they schedule a retrieval run."""
    run = tiny_run(["circle_loss", "cosine", "warmup"], out=tmp_path / "run", task="retrieval", curves=False,
                   set=["warmup.steps=2", "circle_loss.gamma=32"], precision="bf16")
    [row] = run.metrics()
    assert math.isfinite(row["train_loss"]) and 0 <= row["val_map_at_r"] <= 1
    assert row["lr"] < 0.1  # the cosine schedule has decayed the rate by the last step


@pytest.mark.parametrize("sets, extra, fragments", [
    (["retrieval.train_classes=[0,1,2]", "retrieval.eval_classes=[2,3]"], [], ["class 2", "both"]),
    (["retrieval.train_classes=[0,12]"], [], ["class 12", "0-9"]),
    (["retrieval.eval_classes=[9]"], [], ["at least 2 classes", "retrieval.eval_classes"]),
    (["retrieval.per_class=5"], [], ["retrieval.per_class=5", "batch of 32", "one of 8, 16"]),
    (["retrieval.per_class=32"], ["--plugins", "circle_loss"], ["retrieval.per_class=32", "2 to 5 classes"]),
    (["retrieval.embedding_dim=1"], [], ["retrieval.embedding_dim"]),
    ([], ["--val-limit", "6"], ["--val-limit"]),
    ([], ["--batch-size", "7"], ["--batch-size"]),
    ([], ["--plugins", "mixup"], ["mixup", "retrieval"]),
    ([], ["--dataset", "imagefolder", "--data-dir", "NOWHERE"], ["imagefolder", "--dataset"]),
], ids=["overlap", "unknown-class", "one-eval-class", "per-class-not-dividing", "per-class-one-class",
        "embedding-dim", "val-limit", "batch", "mixup", "imagefolder"])
def test_a_refusal_is_one_line(tmp_path, sets, extra, fragments):
    args = [a for s in sets for a in ("--set", s)]
    tiny = list(TINY)
    for flag in ("--val-limit", "--batch-size", "--dataset"):
        if flag in extra:
            i = tiny.index(flag)
            del tiny[i:i + 2]
    code, _, stderr = cli_in_process("run", "--task", "retrieval", *tiny, *args, *extra, "--epochs", "1",
                                     "--out", str(tmp_path / "run"))
    one_line_error(code, stderr, *fragments)
