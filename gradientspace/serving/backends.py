"""vLLM and SGLang as the engine behind `gradientspace route`: what they load, how they are launched, how they name adapters.

Both load plain LoRA folders (`RUN/experts/<k>/` and the generalist) by name next to one base
model, and both batch requests for different adapters together. `backend-command` checks every
folder is one the backend loads — LoRA only, no `modules_to_save` (fully trained copies of whole
modules), no DoRA, bias "none", rank within the backend's limit — and prints the launch command.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports BackendError without loading torch
    from gradientspace.models.inference import ServedAdapter

BACKENDS = ("vllm", "sglang")
# vLLM accepts only these `--max-lora-rank` values (vllm.config.lora.MaxLoRARanks); SGLang takes any.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class BackendError(ValueError):
    """A run cannot be served by the backend, or the upstream is not serving it; the message says which file or name."""


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise BackendError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")


def adapter_rank(folder: Path, backend: str) -> int:
    """The folder's largest LoRA rank, after checking the backend can load the adapter."""
    config_file = folder / "adapter_config.json"
    if not config_file.exists() or not (folder / "adapter_model.safetensors").exists():
        raise BackendError(f"{folder}: not a peft adapter folder (needs adapter_config.json and adapter_model.safetensors)")
    config = json.loads(config_file.read_text())
    problems = {
        "peft_type": config.get("peft_type") != "LORA" and f"is {config.get('peft_type')!r}; {backend} serves LORA adapters only",
        "modules_to_save": bool(config.get("modules_to_save")) and f"is {config['modules_to_save']}; {backend} loads only the LoRA matrices, so those fully trained modules would be lost",
        "use_dora": bool(config.get("use_dora")) and f"is true; {backend} does not load DoRA adapters",
        "bias": config.get("bias", "none") != "none" and f"is {config.get('bias')!r}; {backend} needs bias \"none\"",
    }
    for key, problem in problems.items():
        if problem:
            raise BackendError(f"{config_file}: `{key}` {problem}")
    rank = max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])
    if backend == "vllm" and rank > VLLM_RANKS[-1]:
        raise BackendError(f"{config_file}: `r` is {rank}; vLLM serves LoRA ranks up to {VLLM_RANKS[-1]}")
    return rank


def upstream_model(backend: str, name: str, base: str) -> str:
    """The `model` a request for adapter `name` carries upstream: vLLM takes the LoRA's name, SGLang `BASE:name`."""
    return name if backend == "vllm" else f"{base}:{name}"


def launch_command(backend: str, base: str, served: list[ServedAdapter], port: int | None = None) -> list[str]:
    """The command that serves `base` with every adapter by its public name, each batch holding all of them."""
    check_backend(backend)
    rank = max(adapter_rank(s.folder, backend) for s in served)
    modules = [f"{s.name}={s.folder.resolve()}" for s in served]
    listen = ["--port", str(port)] if port else []
    if backend == "vllm":
        rounded = next(value for value in VLLM_RANKS if value >= rank)
        return ["vllm", "serve", base, *listen, "--enable-lora", "--max-lora-rank", str(rounded), "--max-loras", str(len(served)), "--lora-modules", *modules]
    return ["python", "-m", "sglang.launch_server", "--model-path", base, *listen, "--enable-lora", "--max-lora-rank", str(rank),
            "--max-loras-per-batch", str(len(served)), "--lora-paths", *modules]


def backend_command(run_dir: str | Path, base_model: str, backend: str, port: int | None = None) -> str:
    """`gradientspace backend-command RUN --backend vllm|sglang`: the launch command as one shell line."""
    from gradientspace.models.inference import served_adapters
    from gradientspace.models.loading import resolve
    from gradientspace.runs import RunDirectory

    return shlex.join(launch_command(backend, resolve(base_model), served_adapters(RunDirectory(run_dir)), port))
