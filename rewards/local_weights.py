"""Local checkpoints for the learned rewards: folder and file checks, device and dtype knobs, state dicts.

Learned rewards never call a model hub: every checkpoint is a folder or file named in the reward's
config. A missing one is the commonest launch error, so the message names the config key, the path it
holds and how to fetch the weights on a machine that can reach the hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _missing(owner: str, key: str, path, what: str, fetch: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{owner}: {key}={str(path)!r} is not {what}. Fetch it where the model hub is reachable ({fetch}), copy it "
        f"to this machine and point the config at it: rewards.<name>.{key}=<path>"
    )


def require_folder(path, owner: str, key: str, fetch: str) -> Path:
    """`path` as a Path when it is an existing folder; otherwise FileNotFoundError naming `owner`
    (the reward class), the config `key`, the path and `fetch` (a command that downloads it)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise _missing(owner, key, path, "a folder", fetch)
    return folder


def require_file(path, owner: str, key: str, fetch: str) -> Path:
    """`path` as a Path when it is an existing file; otherwise FileNotFoundError as in require_folder."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise _missing(owner, key, path, "a file", fetch)
    return file


def resolve_device(device: str) -> torch.device:
    """"auto" is the current CUDA device when CUDA is available (the trainer has already called
    torch.cuda.set_device(local_rank), so each rank gets its own GPU), else the CPU; anything else
    goes to torch.device as given ("cpu", "cuda", "cuda:1")."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    """The torch dtype for a config name in DTYPES; ValueError naming the choices otherwise."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch pickle (.pt/.pth/.bin) read with weights_only=True
    (plain tensors and containers only: a checkpoint cannot run code on load)."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file), device="cpu")
    return torch.load(file, map_location="cpu", weights_only=True)
