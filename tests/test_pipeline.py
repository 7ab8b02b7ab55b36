"""`gradientspace cluster` end to end on tiny-random: outputs, resume, interruption, every method."""

import json

import pytest
import torch
from conftest import interrupted_after, make_records
from safetensors.torch import load_file

from gradientspace import cluster, load_config
from gradientspace.cli import main
from gradientspace.clustering import stages


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [
        {"id": r.id, "instruction": r.messages[0]["content"], "output": r.response, "source": r.source}
        for r in make_records(24)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def config_for(data_file, out, **overrides):
    base = {
        "model.name": "tiny-random",
        "model.lora_rank": 2,
        "data.path": str(data_file),
        "data.max_length": 96,
        "out": str(out),
        "sketch.rank": 4,
        "cluster.method": "gradientspace",
        "cluster.k": 3,
        "gradients.batch_size": 4,
        "gradients.checkpoint_every": 1,
        "warmup.fraction": 0.25,
    }
    base.update(overrides)
    return load_config(None, base)


def test_cli_writes_run_and_resumes(data_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = [
        "cluster",
        "--model",
        "tiny-random",
        "--method",
        "gradientspace",
        "--data",
        str(data_file),
        "--k",
        "3",
        "--out",
        str(out),
        "--max-length",
        "96",
        "--set",
        "sketch.rank=4",
        "--set",
        "model.lora_rank=2",
        "--set",
        "warmup.fraction=0.25",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "nmi" in printed and "clusters.jsonl" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"nmi", "ari", "purity", "captured_energy"} <= set(manifest["stages"]["cluster"]["metrics"])
    assert 0 < manifest["stages"]["cluster"]["metrics"]["captured_energy"] <= 1
    assert manifest["config"]["sketch"]["rank"] == 4 and "torch" in manifest["versions"]
    assert all(manifest["stages"][s]["done"] for s in ("data", "warmup", "gradients", "cluster"))
    assignments = [json.loads(line) for line in (out / "clusters.jsonl").read_text().splitlines()]
    assert [a["id"] for a in assignments] == [f"r{i}" for i in range(24)]
    assert {a["cluster"] for a in assignments} <= {0, 1, 2}
    sketch = load_file(str(out / "sketch.safetensors"))
    assert sketch["coordinates"].shape == (24, 4) and torch.equal(sketch["indices"], torch.arange(24))
    assert (out / "warmup" / "adapter_config.json").exists()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(stages, "run_gradient_pass", must_not_run)
    monkeypatch.setattr(stages, "train_adapter", must_not_run)
    assert main(argv) == 0
    again = [json.loads(line) for line in (out / "clusters.jsonl").read_text().splitlines()]
    assert again == assignments


def test_interrupted_gradient_pass_resumes_to_the_same_sketch(data_file, tmp_path, monkeypatch):
    clean = cluster(config_for(data_file, tmp_path / "clean"))
    real_stream = stages.stream_gradients
    monkeypatch.setattr(stages, "stream_gradients", interrupted_after(real_stream, 3))
    with pytest.raises(KeyboardInterrupt):
        cluster(config_for(data_file, tmp_path / "resumed"))
    assert list((tmp_path / "resumed" / "checkpoints").glob("gradients.rank0.safetensors"))
    monkeypatch.setattr(stages, "stream_gradients", real_stream)
    resumed = cluster(config_for(data_file, tmp_path / "resumed"))
    a = load_file(str(tmp_path / "clean" / "sketch.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "sketch.safetensors"))
    assert torch.allclose(a["coordinates"], b["coordinates"], atol=1e-10)
    assert resumed.labels == clean.labels


@pytest.mark.parametrize(
    "method, extra",
    [
        ("random-projection", {"cluster.projection_dim": 8}),
        ("exact", {}),
        ("embedding", {}),
        ("random", {}),
        (
            "gradientspace",
            {
                "cluster.k": "auto",
                "cluster.k_max": 4,
                "gradients.tokens": "instruction",
                "gradients.adam_precondition": True,
            },
        ),
    ],
)
def test_every_method_runs(data_file, tmp_path, method, extra):
    outcome = cluster(config_for(data_file, tmp_path / method, **{"cluster.method": method, **extra}))
    assert len(outcome.labels) == 24 and sum(outcome.sizes) == 24
    assert {"nmi", "ari", "purity"} <= set(outcome.metrics)
    if method == "random-projection":
        assert load_file(str(tmp_path / method / "projection-8.safetensors"))["features"].shape == (24, 8)
    if extra.get("cluster.k") == "auto":
        stage = json.loads((tmp_path / method / "manifest.json").read_text())["stages"]["cluster"]
        assert set(stage["silhouette"]) == {"2", "3", "4"} and outcome.k in (2, 3, 4)


def test_exact_and_sketch_agree_when_rank_is_full(data_file, tmp_path):
    """With r' ≥ N the sketch coordinates are an exact rotation of the full gradients: same Gram matrix."""
    config = config_for(
        data_file, tmp_path / "exact", **{"cluster.method": "exact", "sketch.rank": 24, "sketch.internal_rank": 24}
    )
    cluster(config)
    full = load_file(str(tmp_path / "exact" / "gradients-exact.safetensors"))["features"].double()
    coordinates = load_file(str(tmp_path / "exact" / "sketch.safetensors"))["coordinates"].double()
    assert torch.allclose(coordinates @ coordinates.T, full @ full.T, atol=1e-5)


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    assert main(["cluster", "--model", "tiny-random", "--data", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert main(["cluster", "--set", "sketch.rnak=3", "--out", str(tmp_path / "r")]) == 2
    assert "sketch.rnak" in capsys.readouterr().err


def test_all_linear_with_checkpointing_end_to_end(data_file, tmp_path):
    """`--set model.target_modules=all-linear` reaches peft, and the MLP projections enter the gradient."""
    out = tmp_path / "all-linear"
    argv = [
        "cluster",
        "--model",
        "tiny-random",
        "--method",
        "gradientspace",
        "--data",
        str(data_file),
        "--k",
        "3",
        "--out",
        str(out),
        "--max-length",
        "96",
        "--set",
        "sketch.rank=4",
        "--set",
        "model.lora_rank=2",
        "--set",
        "warmup.fraction=0.25",
        "--set",
        "model.target_modules=all-linear",
        "--set",
        "gradients.activation_checkpointing=true",
    ]
    assert main(argv) == 0
    layout = json.loads((out / "manifest.json").read_text())["stages"]["gradients"]["layout"]
    names = [p["name"] for p in layout["parameters"]]
    assert any("down_proj.lora_B" in n for n in names) and any("q_proj.lora_A" in n for n in names)
    assert len(names) == 2 * 2 * 7  # 2 layers × 7 projections × (A, B)
