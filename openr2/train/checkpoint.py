"""Training checkpoints: atomic save and exact resume (model, optimizer, step, RNG, data position).

Layout of a run directory:
    out_dir/step-0000040/   config.json + model*.safetensors (HF layout, openr2/checkpoints.py), tokenizer files
                            when a tokenizer is given, trainer_state.pt (optimizer, scheduler, step, data
                            position, RNG states, the training config)
    out_dir/latest          one line: the name of the newest complete step directory

A save writes everything into a hidden temporary directory, fsyncs every file and the directory, renames it
into place and only then rewrites `latest` (temp file + os.replace), so a crash (SIGKILL, power loss) at any
moment leaves either the previous checkpoint or the new one, never a half-written one behind `latest`.
Older step directories beyond `keep_last` are removed after the pointer moves.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any

import torch

TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
_REQUIRED_KEYS = ("step", "optimizer", "data", "rng")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


# ---------------------------------------------------------------------------------------------- RNG

def rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), python and numpy RNG states, in a form torch.load(weights_only=True) accepts."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------- save

def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            _fsync_path(os.path.join(root, f))
        _fsync_path(root)


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, path) of the complete step directories under out_dir, oldest first."""
    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(out_dir, name)):
            found.append((int(m.group(1)), os.path.join(out_dir, name)))
    return sorted(found)


def save_checkpoint(out_dir: str | os.PathLike, model: torch.nn.Module, tokenizer: Any, optimizer_state: dict,
                    scheduler: Any, step: int, data_state: dict | None, rng: dict | None = None,
                    config: dict | None = None, keep_last: int | None = None, extra: dict | None = None) -> str:
    """Write out_dir/step-XXXXXXX atomically, point `latest` at it, keep the newest `keep_last`; return its path.

    `optimizer_state` is the optimizer's state dict (parameter-name keyed under data parallelism, see
    trainer.py). `rng` defaults to the current RNG states (rng_states()). `scheduler` may be None or anything with
    state_dict(). `extra` is stored as is (must be torch.load(weights_only=True)-safe).
    """
    from openr2.checkpoints import save_model

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    name = step_dir_name(step)
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".tmp-{name}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    try:
        save_model(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state = {
            "step": int(step),
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "data": data_state,
            "rng": rng if rng is not None else rng_states(),
            "config": config,
            "extra": extra,
        }
        torch.save(state, os.path.join(tmp, TRAINER_STATE))
        _fsync_tree(tmp)
        if os.path.exists(final):  # re-saving a step (e.g. Ctrl-C right after a periodic save)
            old = final + f".old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_path(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer_tmp = os.path.join(out_dir, f".{LATEST}.tmp-{os.getpid()}")
    with open(pointer_tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(out_dir, LATEST))
    _fsync_path(out_dir)
    if keep_last is not None and keep_last > 0:
        for _s, path in list_checkpoints(out_dir)[:-keep_last]:
            if os.path.basename(path) != name:
                shutil.rmtree(path, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------- load

def resolve_checkpoint(path: str | os.PathLike) -> str:
    """A run directory (follows `latest`) or a step directory -> the step directory; FileNotFoundError else."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if os.path.isfile(os.path.join(path, TRAINER_STATE)) or os.path.isfile(os.path.join(path, "config.json")):
        return path
    pointer = os.path.join(path, LATEST)
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
        if not _STEP_DIR.match(name):
            raise ValueError(f"{pointer}: corrupt pointer {name!r} (expected step-XXXXXXX)")
        target = os.path.join(path, name)
        if not os.path.isdir(target):
            raise FileNotFoundError(f"{pointer} names {name}, but {target} does not exist")
        return target
    raise FileNotFoundError(f"{path}: neither a checkpoint (no {TRAINER_STATE}) nor a run directory (no {LATEST})")


def load_checkpoint(path: str | os.PathLike, load_weights: bool = True, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (run directory or step directory) -> {"path", "step", "optimizer", "scheduler",
    "data", "rng", "config", "extra", "model" (a loaded Transformer, or None with load_weights=False)}.

    Raises FileNotFoundError naming the missing file, ValueError naming the corrupt one.
    """
    step_dir = resolve_checkpoint(path)
    state_file = os.path.join(step_dir, TRAINER_STATE)
    for needed in (state_file, os.path.join(step_dir, "config.json")):
        if not os.path.isfile(needed):
            raise FileNotFoundError(f"{needed}: missing from checkpoint {step_dir}")
    files = os.listdir(step_dir)
    if "model.safetensors" not in files and "model.safetensors.index.json" not in files:
        raise FileNotFoundError(f"{os.path.join(step_dir, 'model.safetensors')}: missing from checkpoint {step_dir}")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, ...
        raise ValueError(f"{state_file}: corrupt trainer state ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED_KEYS):
        raise ValueError(f"{state_file}: corrupt trainer state (expected keys {list(_REQUIRED_KEYS)})")
    state["path"] = step_dir
    state["model"] = None
    if load_weights:
        from openr2.checkpoints import load_model

        try:
            state["model"] = load_model(step_dir, dtype=dtype, device=device)
        except (FileNotFoundError, ValueError):
            raise
        except Exception as e:
            raise ValueError(f"{step_dir}: corrupt model files ({type(e).__name__}: {e})") from e
    return state
