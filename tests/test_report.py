"""report.html on a hand-made run: the cluster browser shows the prompts nearest each centroid, and the browser harness can fail."""

import json
import re

import pytest
import torch
from conftest import opened_run
from safetensors.torch import save_file

from gradientspace.evaluation.report import make_report


def test_cluster_browser_shows_the_prompts_nearest_each_centroid(tmp_path):
    generator = torch.Generator().manual_seed(0)
    coordinates = torch.randn(30, 5, generator=generator, dtype=torch.float64)
    clusters = [i % 3 for i in range(30)]
    (tmp_path / "samples.jsonl").write_text(
        "".join(
            json.dumps({"index": i, "id": f"s{i}", "source": None, "prompt": f"prompt <{i}>"}) + "\n" for i in range(30)
        )
    )
    (tmp_path / "clusters.jsonl").write_text(
        "".join(json.dumps({"id": f"s{i}", "cluster": c}) + "\n" for i, c in enumerate(clusters))
    )
    save_file({"coordinates": coordinates}, str(tmp_path / "sketch.safetensors"))
    terms = {"0": ["integral", "<derivative>"], "1": ["python"], "2": []}
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {"config": {"seed": 0}, "stages": {"cluster": {"done": True, "key": "abc", "seconds": 1.5, "terms": terms}}}
        )
    )
    page = next(p for p in make_report(opened_run(tmp_path)) if p.name == "report.html").read_text()
    assert "prompt &lt;" in page and "prompt <" not in page  # prompts are escaped, not markup
    shown = re.findall(r"<summary>cluster (\d+) · (\d+) samples(?: · ([^<]*))?</summary>(.*?)</details>", page)
    assert [(k, n, named) for k, n, named, _ in shown] == [
        ("0", "10", "integral, &lt;derivative&gt;"),
        ("1", "10", "python"),
        ("2", "10", ""),
    ]
    for k, _, _, body in shown:
        members = [i for i, c in enumerate(clusters) if c == int(k)]
        unit = coordinates / coordinates.norm(dim=1, keepdim=True)
        direction = unit[members].mean(dim=0)
        direction = direction / direction.norm()
        # the naive reference: Euclidean distance of each unit row to the unit mean direction
        nearest = sorted(members, key=lambda i: float((unit[i] - direction).norm()))[:3]
        assert re.findall(r"<b>s(\d+)</b>", body) == [str(i) for i in nearest]
        assert "no expert trained yet" in body


def test_the_browser_harness_sees_errors_broken_images_and_blank_regions(tmp_path):
    from chromium import chromium, load_page, region_std

    if chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<html><body style='margin:0'><div id=blank style='height:200px'></div><img src='missing.png'>"
        "<script>console.error('boom'); notDefined();</script></body></html>"
    )
    page = load_page(
        bad,
        "({width: document.images[0].naturalWidth, box: document.getElementById('blank').getBoundingClientRect().toJSON()})",
    )
    assert (
        any("boom" in e for e in page.errors)
        and any("notDefined" in e for e in page.errors)
        and any("missing.png" in e for e in page.errors)
    )
    assert page.facts["width"] == 0
    assert region_std(page.screenshot, page.facts["box"]) == 0


def test_report_shows_clustering_routing_fallbacks_and_the_scored_data(tmp_path):
    """A 3-cluster run whose keep decisions serve expert 0 whole, drop expert 1 and blend expert 2 at λ = ½; `k: auto`; latency not timed."""
    n, clusters = 12, [i % 3 for i in range(12)]
    (tmp_path / "samples.jsonl").write_text(
        "".join(
            json.dumps({"index": i, "id": f"s{i}", "source": "ab"[i % 2], "prompt": f"p{i}"}) + "\n" for i in range(n)
        )
    )
    (tmp_path / "clusters.jsonl").write_text(
        "".join(json.dumps({"id": f"s{i}", "cluster": c}) + "\n" for i, c in enumerate(clusters))
    )
    for k in range(3):
        (tmp_path / "experts" / str(k)).mkdir(parents=True)
        (tmp_path / "experts" / str(k) / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "experts" / "partition.json").write_text(
        json.dumps({"strategy": "routed", "groups": ["0", "1", "2"], "empty": [], "assignment": {}})
    )
    decisions = {
        "0": {"lambda": 1.0, "reason": "gain"},
        "1": {"lambda": 0.0, "reason": "upper 95% bound +0.0100 is not below 0"},
        "2": {"lambda": 0.5, "reason": "blend gain"},
    }
    (tmp_path / "experts" / "keep.json").write_text(
        json.dumps({"strategy": "routed", "fallback": "single-continued", "groups": decisions})
    )
    (tmp_path / "strategies" / "single-continued").mkdir(parents=True)  # the fall-back, served whole
    (tmp_path / "strategies" / "single-continued" / "partition.json").write_text(
        json.dumps({"groups": ["0"], "empty": []})
    )
    (tmp_path / "experts" / "2" / "blended").mkdir()
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "router.json").write_text(
        json.dumps(
            {
                "classes": 3,
                "threshold": 0.4375,
                "heldout_accuracy": 0.8125,
                "train_accuracy": 0.96875,
                "calibration": {
                    "threshold": 0.4375,
                    "validation_records": 9,
                    "validation_nll": 1.25,
                    "validation_nll_always_expert": 1.5,
                    "validation_nll_always_fallback": 1.375,
                },
            }
        )
    )
    cluster = {
        "done": True,
        "key": "c",
        "method": "gradientspace",
        "k": 3,
        "sizes": [4, 4, 4],
        "silhouette": {"2": 0.125, "3": 0.3125, "4": 0.25},
        "metrics": {"nmi": 0.5625, "purity": 0.6875, "captured_energy": 0.71875},
        "composition": {"0": {"a": 2, "b": 2}, "1": {"a": 2, "b": 2}, "2": {"a": 2, "b": 2}},
        "interference": {str(k): {"size": 4, "mean_cosine": 0.25 * k, "outside_energy": 0.125} for k in range(3)},
    }
    stages = {
        "cluster": cluster,
        **{
            f"experts/routed/{k}": {
                "done": True,
                "samples": 4,
                "steps": 2,
                "initial_eval_loss": 1.5,
                "best_eval_loss": 1.75 if k == 1 else 1.25,
            }
            for k in range(3)
        },
        "keep/routed": {"done": True, "groups": decisions},
    }
    (tmp_path / "manifest.json").write_text(
        json.dumps({"config": {"seed": 0, "evaluate": {"data": "held/test.jsonl", "limit": 6}}, "stages": stages})
    )
    latency = {
        "requests": 0,
        "routing_ms": None,
        "first_token_ms": None,
        "tokens_per_second": None,
        "total_first_token_ms": None,
    }
    row = {"n": 6, "nll": 1.0, "generated": 0}
    (tmp_path / "eval.json").write_text(
        json.dumps(
            {
                "latency": {"routed": latency, "single": latency},
                "test_records": 6,
                "domains": ["a", "b"],
                "routed": {"a": row, "b": row, "overall": row},
                "single": {"a": row, "b": row, "overall": row},
            }
        )
    )
    outputs = make_report(opened_run(tmp_path))
    page = next(p for p in outputs if p.name == "report.html").read_text()
    assert "<code>held/test.jsonl</code>: 6 test records (evaluate.limit = 6)" in page
    for shown in ("0.5625", "0.6875", "0.7188", "0.8125", "0.9688", "0.4375, chosen on 9 validation records", "0.3125"):
        assert shown in page, shown
    assert re.search(
        r"<td>routed</td>.*?<td>0, 2 \(λ = 0.5\)</td><td>1</td>", page
    )  # experts served (blend weight), fell back
    browser = dict(
        (k, body) for k, _, body in re.findall(r"<summary>cluster (\d+) · (\d+) samples</summary>(.*?)</details>", page)
    )
    assert "Served by expert" not in browser["1"] and "is not below 0" in browser["1"]
    assert "Served by the fall-back adapter (single-continued)" in browser["1"]
    assert re.search(r"<td>routed</td>.*?<td>single-continued</td>", page)  # the routing table names the fall-back
    assert (
        "Served by expert <code>experts/0/</code>" in browser["0"]
        and "Served by <code>experts/2/blended/</code>" in browser["2"]
    )
    assert "mean-gradient cosine +0.500" in browser["2"] and "leading directions 0.125" in browser["2"]
    names = {p.name for p in outputs}
    assert "silhouette.png" in names and "latency.png" not in names  # no empty chart when nothing was timed
    assert "Latency was not measured" in page
