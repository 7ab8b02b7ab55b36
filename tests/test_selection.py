"""`gradientspace select`: target gradients in the sketch basis against a naive backward, and rows written back as given."""

import json

import numpy as np
import pytest
from conftest import make_records
from safetensors.torch import load_file

from gradientspace.cli import main

RUN_FLAGS = [
    "--method",
    "gradientspace",
    "--k",
    "2",
    "--max-length",
    "64",
    "--rank",
    "4",
    "--set",
    "warmup.fraction=0.5",
]


@pytest.fixture(scope="module")
def alpaca_run(tmp_path_factory):
    """A clustered tiny run over an Alpaca file with columns of its own (`topic`) and a blank line."""
    root = tmp_path_factory.mktemp("select")
    rows = [
        {"instruction": r.messages[0]["content"], "output": r.response, "topic": r.source, "note": f"row {i}"}
        for i, r in enumerate(make_records(16))
    ]
    lines = [json.dumps(row) for row in rows]
    lines.insert(5, "")  # row numbers in the file no longer equal record numbers
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    assert (
        main(
            [
                "cluster",
                "--model",
                "tiny-random",
                "--data",
                str(root / "train.jsonl"),
                "--out",
                str(root / "run"),
                *RUN_FLAGS,
            ]
        )
        == 0
    )
    return root, rows


def test_target_coordinates_are_the_naive_gradient_in_the_sketch_basis(alpaca_run):
    from peft import set_peft_model_state_dict
    from test_gradients import naive_gradients

    from gradientspace.config import config_from_run
    from gradientspace.data.tokens import tokenize
    from gradientspace.runner import Run
    from gradientspace.selection import target_features

    root, _ = alpaca_run
    run = Run(config_from_run(root / "run"))
    targets = make_records(5, seed=7)
    features = target_features(run, targets, projections=(6,))
    loaded = run.model()
    set_peft_model_state_dict(loaded.model, load_file(str(root / "run" / "warmup" / "adapter_model.safetensors")))
    gradients = naive_gradients(loaded.model, tokenize(targets, loaded.tokenizer, 64), loaded.tokenizer.pad_token_id)
    unit = gradients / gradients.norm(dim=1, keepdim=True)  # the run normalises every gradient (gradients.normalize)
    basis = load_file(str(root / "run" / "sketch.safetensors"))["basis"]
    np.testing.assert_allclose(features["sketch"], (unit @ basis).numpy(), rtol=1e-4, atol=1e-5)
    from gradientspace.clustering.kmeans import RademacherProjector

    projected = RademacherProjector(unit.shape[1], 6, seed=run.config.seed).project(unit)
    np.testing.assert_allclose(features["projection-6"], projected.numpy(), rtol=1e-4, atol=1e-5)


def test_select_writes_the_top_records_as_the_file_holds_them(alpaca_run, tmp_path, capsys):
    from gradientspace.config import config_from_run
    from gradientspace.runner import Run
    from gradientspace.selection import mean_cosine, target_features

    root, rows = alpaca_run
    target = tmp_path / "target.jsonl"
    target.write_text(
        "".join(
            json.dumps({"question": r.messages[0]["content"], "answer": r.response}) + "\n"
            for r in make_records(4, seed=3)
        )
    )
    # the run's data.columns apply to the target too: map this file's columns for the command
    assert (
        main(
            [
                "select",
                str(root / "run"),
                "--target",
                str(target),
                "--top",
                "25%",
                "--out",
                str(tmp_path / "chosen.jsonl"),
            ]
        )
        == 2
    )
    assert "no known layout in the fields `question`, `answer`" in capsys.readouterr().err
    target.write_text(
        "".join(
            json.dumps({"instruction": r.messages[0]["content"], "output": r.response}) + "\n"
            for r in make_records(4, seed=3)
        )
    )
    assert (
        main(
            [
                "select",
                str(root / "run"),
                "--target",
                str(target),
                "--top",
                "25%",
                "--out",
                str(tmp_path / "chosen.jsonl"),
            ]
        )
        == 0
    )
    assert "selected 4 of 16 records" in capsys.readouterr().out
    chosen = [json.loads(line) for line in (tmp_path / "chosen.jsonl").read_text().splitlines()]

    run = Run(config_from_run(root / "run"))
    pool = load_file(str(root / "run" / "sketch.safetensors"))["coordinates"].numpy()
    from gradientspace.data.loading import load_records

    targets = target_features(run, load_records(str(target))[0])["sketch"]
    scores = mean_cosine(pool, targets)
    naive = [float(np.mean([np.dot(p, t) / np.linalg.norm(p) / np.linalg.norm(t) for t in targets])) for p in pool]
    np.testing.assert_allclose(scores, naive, rtol=1e-6)
    assert chosen == [
        rows[i] for i in np.argsort(-np.asarray(naive), kind="stable")[:4]
    ]  # the rows as written, extra columns kept

    assert (
        main(
            [
                "select",
                str(root / "run"),
                "--target",
                str(target),
                "--top",
                "2",
                "--out",
                str(tmp_path / "chosen.jsonl"),
            ]
        )
        == 2
    )
    assert "exists; select never writes over a file" in capsys.readouterr().err
    assert (
        main(
            [
                "select",
                str(root / "run"),
                "--target",
                str(target),
                "--top",
                "0%",
                "--out",
                str(tmp_path / "more.parquet"),
            ]
        )
        == 2
    )
    assert "--top 0%: give a number of records (200) or a share of them" in capsys.readouterr().err
    assert (
        main(
            [
                "select",
                str(root / "run"),
                "--target",
                str(target),
                "--top",
                "3",
                "--out",
                str(tmp_path / "more.parquet"),
            ]
        )
        == 0
    )
    from datasets import Dataset

    assert Dataset.from_parquet(str(tmp_path / "more.parquet")).to_list() == chosen[:3]


def test_select_and_export_refuse_a_data_file_that_changed_since_the_run(alpaca_run, tmp_path, capsys):
    """Row i of the sketch is record i of the file the run read: with another file the rows would name other records."""
    root, _ = alpaca_run
    data = root / "train.jsonl"
    kept = data.read_text()
    target = tmp_path / "target.jsonl"
    target.write_text(json.dumps({"instruction": "alpha beta", "output": "gamma"}) + "\n")
    try:
        data.write_text(kept + json.dumps({"instruction": "a new record", "output": "its answer"}) + "\n")
        for command in (
            ["select", "--target", str(target), "--top", "2", "--out", str(tmp_path / "c.jsonl")],
            ["export", "--out", str(tmp_path / "export")],
        ):
            assert main([command[0], str(root / "run"), *command[1:]]) == 2
            err = capsys.readouterr().err
            assert f"config key `data.path`: {data} holds other records than the run was made from" in err
            assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / "c.jsonl").exists() and not (tmp_path / "export").exists()
    finally:
        data.write_text(kept)
