"""The README fits on a screen and its links resolve; docs/configuration.md is the config's own help, regenerated."""

import re
from pathlib import Path

from gradientspace.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_fits_on_a_screen_and_every_link_resolves():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#]+)\)", readme) + re.findall(r"`((?:docs|bench/results)/[\w./-]+\.md)`", readme)
    assert any(link.startswith("docs/") for link in links)
    for document in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)#:]+)\)", document.read_text()):
            assert (document.parent / link).exists(), f"{document.name} links to {link}, which does not exist"
    for link in links:
        assert (ROOT / link).exists(), link


def test_the_configuration_page_is_the_configs_own_help(capsys):
    assert main(["config-keys", "--markdown"]) == 0
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == capsys.readouterr().out, (
        "docs/configuration.md is stale: gradientspace config-keys --markdown > docs/configuration.md"
    )
    assert "| `train.report_to` | `[]` |" in written and "| `data.split` | `train` |" in written
