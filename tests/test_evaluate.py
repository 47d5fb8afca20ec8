import csv
import io

import numpy as np
import pytest
import torch
from rich.console import Console

from ltcli.errors import LtcliError
from ltcli.groups import shot_groups
from ltcli.metrics import compute_metrics, metrics_table, write_per_class_csv

# Hand-made case. Train counts 150 / 100 / 20 / 19 -> many, medium (100 is not > 100),
# medium (20 is not < 20), few.
COUNTS = [150, 100, 20, 19]
LABELS = [0, 0, 0, 0, 1, 1, 2, 3, 3]
PREDS = [0, 0, 0, 1, 1, 0, 3, 3, 3]  # class 0: 3/4, class 1: 1/2, class 2: 0/1, class 3: 2/2


def one_hot_scores(preds, num_classes):
    scores = torch.zeros(len(preds), num_classes)
    scores[torch.arange(len(preds)), torch.as_tensor(preds)] = 1.0
    return scores


def render(table) -> str:
    console = Console(file=io.StringIO(), width=140, record=True)
    console.print(table)
    return console.export_text()


def test_shot_groups_official_thresholds():
    assert shot_groups([150, 101, 100, 20, 19, 0]).tolist() == [0, 0, 1, 1, 2, 2]
    assert shot_groups(np.array([50, 10, 5]), many=40, few=6).tolist() == [0, 1, 2]
    assert shot_groups(torch.tensor([3, 3])).tolist() == [2, 2]


def test_shot_groups_rejects_few_above_many():
    with pytest.raises(LtcliError, match="few"):
        shot_groups([1, 2], many=10, few=20)


@pytest.mark.parametrize("as_scores", [False, True])
def test_hand_computed_metrics(as_scores):
    scores = one_hot_scores(PREDS, 4) if as_scores else torch.tensor(PREDS)
    m = compute_metrics(scores, LABELS, COUNTS)
    assert m["overall"] == pytest.approx(6 / 9)
    assert m["macro"] == pytest.approx((0.75 + 0.5 + 0.0 + 1.0) / 4)
    assert m["many"] == pytest.approx(0.75)
    assert m["medium"] == pytest.approx(0.25)
    assert m["few"] == pytest.approx(1.0)
    assert m["top5"] is None  # 4 classes, or predictions only
    assert m["group_classes"] == {"many": 1, "medium": 2, "few": 1}
    assert m["group_samples"] == {"many": 4, "medium": 3, "few": 2}
    assert m["n_samples"] == 9 and m["n_classes"] == 4
    assert m["per_class"][1] == {
        "class": 1, "train_count": 100, "n_eval": 2, "correct": 1, "accuracy": 0.5, "group": "medium",
    }
    assert [c["group"] for c in m["per_class"]] == ["many", "medium", "medium", "few"]


def test_numpy_inputs_and_custom_thresholds():
    m = compute_metrics(np.array(PREDS), np.array(LABELS), np.array(COUNTS), many=120, few=50)
    # groups: 150 many; 100 medium; 20, 19 few
    assert m["many"] == pytest.approx(0.75)
    assert m["medium"] == pytest.approx(0.5)
    assert m["few"] == pytest.approx((0.0 + 1.0) / 2)
    assert m["thresholds"] == {"many": 120, "few": 50}


def test_argmax_ties_go_to_lowest_index():
    scores = torch.zeros(3, 3)
    m = compute_metrics(scores, [0, 1, 2], [5, 5, 5])
    assert m["overall"] == pytest.approx(1 / 3)
    assert [c["correct"] for c in m["per_class"]] == [1, 0, 0]
    # a partial tie: classes 1 and 2 tie at the top, 1 wins
    m = compute_metrics(torch.tensor([[0.0, 2.0, 2.0], [0.0, 2.0, 2.0]]), [1, 2], [5, 5, 5])
    assert [c["correct"] for c in m["per_class"]] == [0, 1, 0]


def test_top5():
    row = torch.tensor([6.0, 5, 4, 3, 2, 1])
    scores = row.repeat(3, 1)
    m = compute_metrics(scores, [0, 4, 5], [500] * 6)
    assert m["overall"] == pytest.approx(1 / 3)
    assert m["top5"] == pytest.approx(2 / 3)
    # with ties the lowest indices rank first, as for top-1
    m = compute_metrics(torch.zeros(2, 6), [4, 5], [500] * 6)
    assert m["top5"] == pytest.approx(1 / 2)


def test_top5_matches_torch_topk_on_random_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(500, 30, generator=g)
    labels = torch.randint(0, 30, (500,), generator=g)
    m = compute_metrics(scores, labels, [50] * 30)
    expected = (scores.topk(5, dim=1).indices == labels[:, None]).any(dim=1).double().mean().item()
    assert m["top5"] == pytest.approx(expected)
    assert m["overall"] == pytest.approx((scores.argmax(1) == labels).double().mean().item())


def test_empty_groups_are_none():
    m = compute_metrics(torch.tensor([0, 1, 1]), [0, 1, 1], [500, 300])
    assert m["many"] == pytest.approx(1.0)
    assert m["medium"] is None and m["few"] is None
    assert m["group_classes"] == {"many": 2, "medium": 0, "few": 0}


def test_classes_absent_from_eval_are_left_out_of_the_means():
    # class 2 (few) has no eval sample: few is None, macro averages classes 0 and 1 only
    m = compute_metrics(torch.tensor([0, 0]), [0, 1], [500, 50, 5])
    assert m["macro"] == pytest.approx(0.5)
    assert m["few"] is None
    assert m["group_classes"]["few"] == 1 and m["group_eval_classes"]["few"] == 0
    assert m["per_class"][2]["accuracy"] is None and m["per_class"][2]["n_eval"] == 0


@pytest.mark.parametrize(
    "scores, labels, counts, fragment",
    [
        (torch.zeros(2, 3), [0, 3], [1, 1, 1], "labels"),
        (torch.zeros(2, 3), [0, -1], [1, 1, 1], "labels"),
        (torch.zeros(2, 4), [0, 1], [1, 1, 1], "scores"),
        (torch.tensor([[0.0, float("nan")], [0, 1]]), [0, 1], [1, 1], "NaN"),
        (torch.tensor([0, 1, 1]), [0, 1], [1, 1], "predictions"),
        (torch.zeros(0, 2), [], [1, 1], "no samples"),
        (torch.zeros(2, 2), [0.5, 1.0], [1, 1], "integer"),
        (torch.zeros(2, 2, 2), [0, 1], [1, 1], "shape"),
    ],
)
def test_bad_inputs(scores, labels, counts, fragment):
    with pytest.raises(LtcliError, match=fragment):
        compute_metrics(scores, labels, counts)


def test_metrics_are_json_ready():
    import json

    m = compute_metrics(one_hot_scores(PREDS, 4), LABELS, COUNTS)
    assert json.loads(json.dumps(m)) == m


def test_metrics_table_renders_percentages_and_group_sizes():
    joint = compute_metrics(torch.tensor(PREDS), LABELS, COUNTS)
    crt = compute_metrics(torch.tensor(LABELS), LABELS, COUNTS)
    text = render(metrics_table({"joint": joint, "crt": crt}, title="test split"))
    for col in ("head", "top-1", "top-5", "macro", "many", "medium", "few"):
        assert col in text
    assert "66.7" in text and "56.2" in text and "100.0" in text
    assert "many 1 (>100)" in text and "medium 2 (20–100)" in text and "few 1 (<20)" in text
    assert "–" in text  # top-5 not available


def test_per_class_csv(tmp_path):
    joint = compute_metrics(torch.tensor(PREDS), LABELS, COUNTS + [7])
    crt = compute_metrics(torch.tensor(LABELS), LABELS, COUNTS + [7])
    path = tmp_path / "reports" / "per-class.csv"
    write_per_class_csv(path, {"joint": joint, "crt": crt}, ["a", "b", "c", "d", "e"])
    rows = list(csv.DictReader(path.open()))
    assert [r["name"] for r in rows] == ["a", "b", "c", "d", "e"]
    assert rows[0] == {
        "class": "0", "name": "a", "train_count": "150", "group": "many", "n_eval": "4",
        "joint": "0.750000", "crt": "1.000000",
    }
    assert rows[4]["joint"] == "" and rows[4]["n_eval"] == "0"
    assert sorted(p.name for p in path.parent.iterdir()) == ["per-class.csv"]  # no temp files left


def test_per_class_csv_refuses_mismatched_names(tmp_path):
    m = compute_metrics(torch.tensor(PREDS), LABELS, COUNTS)
    with pytest.raises(LtcliError, match="class names"):
        write_per_class_csv(tmp_path / "x.csv", {"joint": m}, ["a", "b"])
    assert not (tmp_path / "x.csv").exists()
