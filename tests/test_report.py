"""report.html on a hand-made run: the cluster browser shows the prompts nearest each centroid, and the browser harness can fail."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from gradientspace.report import make_report


def test_cluster_browser_shows_the_prompts_nearest_each_centroid(tmp_path):
    generator = torch.Generator().manual_seed(0)
    coordinates = torch.randn(30, 5, generator=generator, dtype=torch.float64)
    clusters = [i % 3 for i in range(30)]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"index": i, "id": f"s{i}", "source": None, "prompt": f"prompt <{i}>"}) + "\n" for i in range(30)))
    (tmp_path / "clusters.jsonl").write_text("".join(json.dumps({"id": f"s{i}", "cluster": c}) + "\n" for i, c in enumerate(clusters)))
    save_file({"coordinates": coordinates}, str(tmp_path / "sketch.safetensors"))
    (tmp_path / "manifest.json").write_text(json.dumps({"config": {"seed": 0}, "stages": {"cluster": {"done": True, "key": "abc", "seconds": 1.5}}}))
    page = next(p for p in make_report(tmp_path) if p.name == "report.html").read_text()
    assert "prompt &lt;" in page and "prompt <" not in page  # prompts are escaped, not markup
    shown = re.findall(r"<summary>cluster (\d+) · (\d+) samples</summary>(.*?)</details>", page)
    assert [(k, n) for k, n, _ in shown] == [("0", "10"), ("1", "10"), ("2", "10")]
    for k, _, body in shown:
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
    bad.write_text("<html><body style='margin:0'><div id=blank style='height:200px'></div><img src='missing.png'>"
                   "<script>console.error('boom'); notDefined();</script></body></html>")
    page = load_page(bad, "({width: document.images[0].naturalWidth, box: document.getElementById('blank').getBoundingClientRect().toJSON()})")
    assert any("boom" in e for e in page.errors) and any("notDefined" in e for e in page.errors) and any("missing.png" in e for e in page.errors)
    assert page.facts["width"] == 0
    assert region_std(page.screenshot, page.facts["box"]) == 0
