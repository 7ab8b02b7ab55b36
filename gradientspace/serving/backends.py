"""The serving backends behind `gradientspace route` (vLLM, SGLang): what they load, how they are launched, how they name adapters.

`BACKENDS` is the registry: a new backend is one `Backend` subclass here and one entry there; the
CLI's `--backend` choices come from it.

Both load plain LoRA folders (`RUN/experts/<k>/` and the fall-back adapter) by name next to one base
model, and both batch requests for different adapters together. `backend-command` checks every
folder is one the backend loads — LoRA only, no `modules_to_save` (fully trained copies of whole
modules), no DoRA, bias "none", rank within the backend's limit — and prints the launch command.
"""

from __future__ import annotations

import json
import shlex
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports BackendError without loading torch
    from gradientspace.routing.model import ServedAdapter
    from gradientspace.runner import Run


class BackendError(ValueError):
    """A run cannot be served by the backend, or the upstream is not serving it; the message says which file or name."""


class Backend(ABC):
    """An inference server that serves one base model with named LoRA adapters, in front of which `route` sends requests."""

    name: str
    max_rank: int | None = None  # the largest LoRA rank it loads

    def allowed_rank(self, rank: int) -> int:
        """The rank limit to launch it with, for adapters up to `rank`."""
        return rank

    @abstractmethod
    def upstream_model(self, name: str, base: str) -> str:
        """The `model` a request for adapter `name` carries upstream."""

    @abstractmethod
    def launch_command(self, base: str, modules: list[str], rank: int, adapters: int, listen: list[str]) -> list[str]:
        """The command serving `base` with `modules` (`name=folder` each), `adapters` of them in every batch."""


class VLLM(Backend):
    name = "vllm"
    # vLLM accepts only these `--max-lora-rank` values (vllm.config.lora.MaxLoRARanks)
    ranks = (1, 8, 16, 32, 64, 128, 256, 320, 512)
    max_rank = ranks[-1]

    def allowed_rank(self, rank):
        return next(value for value in self.ranks if value >= rank)

    def upstream_model(self, name, base):
        return name  # vLLM names a request's LoRA by its own name

    def launch_command(self, base, modules, rank, adapters, listen):
        return [
            "vllm",
            "serve",
            base,
            *listen,
            "--enable-lora",
            "--max-lora-rank",
            str(rank),
            "--max-loras",
            str(adapters),
            "--lora-modules",
            *modules,
        ]


class SGLang(Backend):
    name = "sglang"

    def upstream_model(self, name, base):
        return f"{base}:{name}"

    def launch_command(self, base, modules, rank, adapters, listen):
        return [
            "python",
            "-m",
            "sglang.launch_server",
            "--model-path",
            base,
            *listen,
            "--enable-lora",
            "--max-lora-rank",
            str(rank),
            "--max-loras-per-batch",
            str(adapters),
            "--lora-paths",
            *modules,
        ]


BACKENDS: dict[str, Backend] = {b.name: b for b in (VLLM(), SGLang())}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise BackendError(f"--backend {name!r} is not one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def adapter_rank(folder: Path, backend: Backend) -> int:
    """The folder's largest LoRA rank, after checking the backend can load the adapter."""
    config_file = folder / "adapter_config.json"
    if not config_file.exists() or not (folder / "adapter_model.safetensors").exists():
        raise BackendError(
            f"{folder}: not a peft adapter folder (needs adapter_config.json and adapter_model.safetensors)"
        )
    config = json.loads(config_file.read_text())
    name = backend.name
    problems = {
        "peft_type": config.get("peft_type") != "LORA"
        and f"is {config.get('peft_type')!r}; {name} serves LORA adapters only",
        "modules_to_save": bool(config.get("modules_to_save"))
        and f"is {config['modules_to_save']}; {name} loads only the LoRA matrices, so those fully trained modules would be lost",
        "use_dora": bool(config.get("use_dora")) and f"is true; {name} does not load DoRA adapters",
        "bias": config.get("bias", "none") != "none" and f'is {config.get("bias")!r}; {name} needs bias "none"',
    }
    for key, problem in problems.items():
        if problem:
            raise BackendError(f"{config_file}: `{key}` {problem}")
    rank = max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])
    if backend.max_rank is not None and rank > backend.max_rank:
        raise BackendError(f"{config_file}: `r` is {rank}; {name} serves LoRA ranks up to {backend.max_rank}")
    return rank


def upstream_model(backend: str, name: str, base: str) -> str:
    """The `model` a request for adapter `name` carries upstream (vLLM: the LoRA's name, SGLang: `BASE:name`)."""
    return get_backend(backend).upstream_model(name, base)


def launch_command(backend: str, base: str, served: list[ServedAdapter], port: int | None = None) -> list[str]:
    """The command that serves `base` with every adapter by its public name, each batch holding all of them."""
    server = get_backend(backend)
    rank = max(adapter_rank(s.folder, server) for s in served)
    modules = [f"{s.name}={s.folder.resolve()}" for s in served]
    return server.launch_command(
        base, modules, server.allowed_rank(rank), len(served), ["--port", str(port)] if port else []
    )


def backend_command(run: Run, backend: str, port: int | None = None) -> str:
    """`gradientspace backend-command RUN --backend vllm|sglang`: the launch command as one shell line."""
    from gradientspace.models.loading import resolve
    from gradientspace.routing.model import served_adapters

    base = resolve(run.config.model.name)
    return shlex.join(launch_command(backend, base, served_adapters(run), port))
