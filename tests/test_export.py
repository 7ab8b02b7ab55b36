"""`gradientspace export`: the run's records, clusters and sketch coordinates, read back by `datasets` and numpy."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from gradientspace.cli import main


def test_export_is_read_back_by_datasets_and_numpy_and_matches_the_run(served_tiny_run, tmp_path, capsys):
    from datasets import load_dataset, load_from_disk

    from gradientspace.config import config_from_run
    from gradientspace.experts.adapters import read_partition
    from gradientspace.routing.model import served_adapters
    from gradientspace.runner import Run

    run = Run(config_from_run(served_tiny_run))
    assert main(["export", str(served_tiny_run), "--out", str(tmp_path / "export")]) == 0
    records = load_from_disk(str(tmp_path / "export" / "records"))
    clusters = [json.loads(line)["cluster"] for line in (served_tiny_run / "clusters.jsonl").read_text().splitlines()]
    sketch = load_file(str(served_tiny_run / "sketch.safetensors"))["coordinates"].float().numpy()
    assert records["id"] == [r.id for r in run.records] and records["cluster"] == clusters
    assert (
        records["response"] == [r.response for r in run.records] and records["messages"][0] == run.records[0].messages
    )
    assert sorted(i for i, split in zip(records["id"], records["split"]) if split == "validation") == sorted(
        run.validation_ids
    )
    np.testing.assert_array_equal(np.asarray(records["coordinates"], dtype=np.float32), sketch)

    # each record's adapter: its cluster's expert where that is served, else the fall-back, as `serve` names them
    served = {adapter.name for adapter in served_adapters(run, "routed")}
    partition = read_partition(run, "routed")
    for record_id, adapter in zip(records["id"], records["adapter"]):
        expert = f"expert-{partition['groups'][partition['assignment'][record_id]]}"
        assert adapter == (expert if expert in served else "generalist")

    mapped = np.load(tmp_path / "export" / "sketch" / "coordinates.npy", mmap_mode="r")
    info = json.loads((tmp_path / "export" / "sketch" / "info.json").read_text())
    assert (
        isinstance(mapped, np.memmap)
        and mapped.dtype == np.float32
        and list(mapped.shape) == info["shape"] == list(sketch.shape)
    )
    np.testing.assert_array_equal(mapped, sketch)
    assert info["rank"] == sketch.shape[1] and info["config_key"] == run.stage_entry("gradients")["key"]
    assert info["basis"]["tensor"] in load_file(info["basis"]["file"])
    summary = json.loads((tmp_path / "export" / "clusters.json").read_text())["clusters"]
    assert {k: v["size"] for k, v in summary.items()} == {str(k): clusters.count(k) for k in set(clusters)}
    assert {k: v["terms"] for k, v in summary.items()} == run.stage_entry("cluster")["terms"]

    for fmt, reader in (("parquet", "parquet"), ("jsonl", "json")):
        assert main(["export", str(served_tiny_run), "--out", str(tmp_path / fmt), "--format", fmt]) == 0
        file = next((tmp_path / fmt).glob("records.*"))
        again = load_dataset(reader, data_files=str(file), split="train")
        assert (
            again["id"] == records["id"]
            and again["adapter"] == records["adapter"]
            and again["cluster"] == records["cluster"]
        )
        np.testing.assert_allclose(np.asarray(again["coordinates"], dtype=np.float32), sketch)


@pytest.mark.parametrize(
    "where, message",
    [
        ("non-empty", "exists and is not an empty folder; the export never writes over files"),
        ("inside-run", "lies inside the run directory"),
    ],
)
def test_export_never_writes_over_a_folder_or_into_the_run(served_tiny_run, tmp_path, capsys, where, message):
    out = tmp_path / "mine"
    if where == "non-empty":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    else:
        out = served_tiny_run / "export"
    assert main(["export", str(served_tiny_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (served_tiny_run / "export").exists()
    if where == "non-empty":
        assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_export_names_no_adapter_for_clusters_the_experts_were_not_trained_on(served_tiny_run, tmp_path):
    """After a re-cluster whose experts were not retrained, a record's cluster and its group's expert no longer agree."""
    from conftest import copied_run
    from datasets import load_from_disk

    run = copied_run(served_tiny_run, tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["cluster"]["key"] = "another-clustering"
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    assert "adapter" not in load_from_disk(str(tmp_path / "export" / "records")).column_names


def test_a_default_run_clusters_prompt_embeddings_with_no_gradient_pass_and_exports_no_coordinates(tmp_path, capsys):
    """`cluster.method` defaults to `embedding` (the pre-registered test's H2): no warm-up, no gradient pass, the clusters
    of the `embedding-clusters` arm; export writes records and clusters without coordinates, and select, which ranks
    records in the sketch, refuses the run in one line."""
    from conftest import write_records

    from gradientspace.config import config_from_run
    from gradientspace.experts.strategies import get
    from gradientspace.runner import Run

    data = tmp_path / "train.jsonl"
    write_records(data, 12)
    run_dir = tmp_path / "run"
    assert main(["cluster", "--model", "tiny-random", "--data", str(data), "--out", str(run_dir), "--k", "2"]) == 0
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert "warmup" not in stages and "gradients" not in stages and stages["cluster"]["method"] == "embedding"
    assert not (run_dir / "sketch.safetensors").exists()
    run = Run(config_from_run(run_dir))
    clusters = [json.loads(line)["cluster"] for line in (run_dir / "clusters.jsonl").read_text().splitlines()]
    assert clusters == get("embedding-clusters").labels(run, run.config, run.records)
    capsys.readouterr()

    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    assert "no sketch coordinates" in capsys.readouterr().out
    from datasets import load_from_disk

    records = load_from_disk(str(tmp_path / "export" / "records"))
    assert "coordinates" not in records.column_names and records["cluster"] == clusters
    assert not (tmp_path / "export" / "sketch").exists()

    target = tmp_path / "target.jsonl"
    write_records(target, 2)
    argv = ["select", str(run_dir), "--target", str(target), "--top", "3", "--out", str(tmp_path / "chosen.jsonl")]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "`cluster.method: embedding`" in error and "--method gradientspace" in error
    assert not (tmp_path / "chosen.jsonl").exists()
