"""The serving backends' registry: launch commands, adapter names upstream, and the folder checks."""

import json

import pytest
import torch
from safetensors.torch import save_file

from gradientspace.routing.model import ServedAdapter
from gradientspace.serving import backends
from gradientspace.serving.backends import BACKENDS, BackendError, launch_command, upstream_model


def adapter_folder(path, rank: int, **extra):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "bias": "none", **extra}))
    save_file({"w": torch.zeros(1)}, str(path / "adapter_model.safetensors"))
    return path


def test_vllm_and_sglang_launch_every_adapter_at_an_allowed_rank(tmp_path):
    served = [
        ServedAdapter("expert-0", 0, adapter_folder(tmp_path / "a", 8)),
        ServedAdapter("generalist", -1, adapter_folder(tmp_path / "b", 16)),
    ]
    vllm = launch_command("vllm", "base", served, 8001)
    assert (
        vllm[:3] == ["vllm", "serve", "base"]
        and vllm[vllm.index("--max-lora-rank") + 1] == "16"
        and vllm[vllm.index("--max-loras") + 1] == "2"
    )
    assert f"expert-0={(tmp_path / 'a').resolve()}" in vllm and vllm[vllm.index("--port") + 1] == "8001"
    sglang = launch_command("sglang", "base", served)
    assert (
        "sglang.launch_server" in sglang
        and "--port" not in sglang
        and sglang[sglang.index("--max-lora-rank") + 1] == "16"
    )
    assert (
        upstream_model("vllm", "expert-0", "base") == "expert-0"
        and upstream_model("sglang", "expert-0", "base") == "base:expert-0"
    )
    # vLLM rounds a rank up to one it accepts; above its largest it refuses, naming the file
    assert launch_command("vllm", "base", [ServedAdapter("e", 0, adapter_folder(tmp_path / "c", 12))])[4:6] == [
        "--max-lora-rank",
        "16",
    ]
    with pytest.raises(BackendError, match=r"d/adapter_config.json: `r` is 1024; vllm serves LoRA ranks up to 512"):
        launch_command("vllm", "base", [ServedAdapter("e", 0, adapter_folder(tmp_path / "d", 1024))])
    with pytest.raises(BackendError, match="`use_dora` is true; sglang does not load DoRA"):
        launch_command("sglang", "base", [ServedAdapter("e", 0, adapter_folder(tmp_path / "e", 8, use_dora=True))])
    with pytest.raises(BackendError, match="--backend 'tgi' is not one of vllm, sglang"):
        launch_command("tgi", "base", served)


def test_a_backend_added_to_the_registry_is_launched_and_named(tmp_path, monkeypatch):
    class Echo(backends.Backend):
        name = "echo"

        def upstream_model(self, name, base):
            return f"{name}@{base}"

        def launch_command(self, base, modules, rank, adapters, listen):
            return ["echo", base, str(rank), str(adapters), *modules]

    monkeypatch.setitem(BACKENDS, "echo", Echo())
    served = [ServedAdapter("expert-0", 0, adapter_folder(tmp_path / "a", 4))]
    assert launch_command("echo", "base", served) == [
        "echo",
        "base",
        "4",
        "1",
        f"expert-0={(tmp_path / 'a').resolve()}",
    ]
    assert upstream_model("echo", "expert-0", "base") == "expert-0@base"
