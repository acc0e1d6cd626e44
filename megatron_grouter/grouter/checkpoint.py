"""The Grouter checkpoint: one directory, two files, written atomically, refused loudly.

    <dir>/config.json        {"format": "megatron-grouter/grouter", "format_version": 1,
                              "architecture": GrouterConfig, "num_experts": E,
                              "tokenizer": {"vocab_size", "sha256"},
                              "tensors_sha256": sha256 of model.safetensors,
                              "provenance": {source_model, source_layer, tokens_seen, history: [...]},
                              "config_sha256": sha256 of all the above (canonical JSON)}
    <dir>/model.safetensors  every parameter and the `expert_bias` buffer

Saving writes both files into a fresh temporary directory beside the target and only then renames
it into place, so a reader sees the old checkpoint or the new one, never half of one; a crash
leaves at most a hidden `.<name>.*.tmp` directory that no loader looks at. Loading checks the
format, the config's own checksum (an edited config.json is refused; one saved before the
checksum existed loads with a warning and `python -m megatron_grouter.grouter.checkpoint upgrade
DIR` adds it), the expert count and the tokenizer against what the caller will use it with, and
the tensors' checksum, names, shapes and dtypes against the config, and refuses with one line.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from megatron_grouter.atomic_files import atomic_directory
from megatron_grouter.errors import UserError
from megatron_grouter.grouter.config import GrouterConfig
from megatron_grouter.grouter.network import Grouter

FORMAT = "megatron-grouter/grouter"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TENSORS_FILE = "model.safetensors"
CONFIG_CHECKSUM = "config_sha256"

log = logging.getLogger("megatron_grouter")


@dataclass
class GrouterCheckpointInfo:
    """What a checkpoint says about itself besides its tensors."""

    path: Path
    config: GrouterConfig
    tokenizer: dict[str, Any]
    provenance: dict[str, Any]
    format_version: int = FORMAT_VERSION

    @property
    def num_experts(self) -> int:
        return self.config.num_experts


def new_provenance(source_model: str | None = None, source_layer: int | None = None,
                   tokens_seen: int = 0) -> dict[str, Any]:
    """A fresh provenance record (what a distillation run starts from)."""
    return {"source_model": source_model, "source_layer": source_layer, "tokens_seen": tokens_seen,
            "history": []}


def with_history_step(provenance: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    """A copy of `provenance` with one more history entry (e.g. {"step": "fold", ...})."""
    updated = copy.deepcopy(provenance)
    updated.setdefault("history", []).append(dict(step))
    return updated


def save_grouter(model: Grouter, directory: str | os.PathLike, provenance: dict[str, Any],
                 tokenizer_fingerprint: dict[str, Any]) -> Path:
    """Write `model` as a Grouter checkpoint directory, atomically replacing an older one there."""
    target = Path(directory)
    config = model.config
    tokenizer = _checked_tokenizer(tokenizer_fingerprint, config)
    _refuse_foreign_directory(target)
    tensors = _tensors_to_save(model)
    with atomic_directory(target) as staging:
        tensor_bytes = save_safetensors_bytes(tensors, metadata={"format": "pt"})
        (staging / TENSORS_FILE).write_bytes(tensor_bytes)
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": config.to_dict(),
            "num_experts": config.num_experts,
            "tokenizer": tokenizer,
            "tensors_sha256": hashlib.sha256(tensor_bytes).hexdigest(),
            "provenance": _complete_provenance(provenance),
        }
        try:
            header[CONFIG_CHECKSUM] = config_checksum(header)
            text = json.dumps(header, indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as error:
            raise UserError(f"Grouter provenance or tokenizer fingerprint is not plain JSON ({error}); "
                            "pass only strings, numbers, booleans, lists and dicts") from None
        (staging / CONFIG_FILE).write_text(text)
    return target


def load_grouter(directory: str | os.PathLike, expected_num_experts: int | None = None,
                 expected_tokenizer: dict[str, Any] | None = None,
                 map_location: str | torch.device = "cpu") -> tuple[Grouter, GrouterCheckpointInfo]:
    """Load and validate a Grouter checkpoint; any mismatch raises a one-line UserError."""
    path = Path(directory)
    header = read_grouter_header(path)
    config = _header_config(path, header)
    if expected_num_experts is not None and expected_num_experts != config.num_experts:
        convert = ("fold it to {n} experts with mg-fold" if config.num_experts > expected_num_experts
                   else "expand it to {n} experts with mg-expand").format(n=expected_num_experts)
        raise UserError(f"Grouter at {path} has {config.num_experts} experts but the model has "
                        f"{expected_num_experts}; {convert}, or set model.num_experts={config.num_experts}")
    tokenizer, provenance = header.get("tokenizer"), header.get("provenance")
    if not isinstance(tokenizer, dict):
        _bad(path, "has no tokenizer fingerprint in config.json")
    if not isinstance(provenance, dict):
        _bad(path, "has no provenance object in config.json")
    if expected_tokenizer is not None:
        _check_same_tokenizer(path, tokenizer, expected_tokenizer)
    tensors = _read_tensors(path, header.get("tensors_sha256"))
    _check_tensors(path, tensors, config)
    with torch.device("meta"):
        model = Grouter(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    info = GrouterCheckpointInfo(path=path, config=config, tokenizer=dict(tokenizer),
                                 provenance=provenance, format_version=header["format_version"])
    return model.to(map_location), info


def read_grouter_header(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a Grouter checkpoint, after format and version checks."""
    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"Grouter checkpoint {path} does not exist or is not a directory; pass the "
                        "directory written by mg-distill (router.grouter.path=...)")
    missing = [name for name in (CONFIG_FILE, TENSORS_FILE) if not (path / name).is_file()]
    if missing:
        _bad(path, f"lacks {' and '.join(missing)}")
    try:
        header = json.loads((path / CONFIG_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        _bad(path, f"has an unreadable {CONFIG_FILE} ({error})")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise UserError(f"{path}/{CONFIG_FILE} is not a Grouter checkpoint (format={found!r}, expected "
                        f"{FORMAT!r}); pass a directory written by save_grouter/mg-distill")
    if header.get("format_version") != FORMAT_VERSION:
        raise UserError(f"Grouter at {path} has format_version={header.get('format_version')!r} but this "
                        f"megatron-grouter reads version {FORMAT_VERSION}; use a matching megatron-grouter "
                        "release or re-export the Grouter")
    _check_config_checksum(path, header)
    return header


def config_checksum(header: dict[str, Any]) -> str:
    """sha256 of everything config.json says but the checksum itself (canonical JSON: keys sorted,
    no spaces), so an edited architecture, tokenizer, tensor checksum or provenance is detected."""
    covered = {key: value for key, value in header.items() if key != CONFIG_CHECKSUM}
    return hashlib.sha256(json.dumps(covered, sort_keys=True, separators=(",", ":"),
                                     allow_nan=False).encode()).hexdigest()


def _check_config_checksum(path: Path, header: dict[str, Any]) -> None:
    recorded = header.get(CONFIG_CHECKSUM)
    if recorded is None:
        # Saved before config.json carried a checksum: still read, but its config is unverified.
        log.warning("Grouter at %s predates config checksums: its config.json is not verified; upgrade "
                    "it with `python -m megatron_grouter.grouter.checkpoint upgrade %s`", path, path)
        return
    try:
        actual = config_checksum(header)
    except ValueError:
        actual = None
    if actual != recorded:
        raise UserError(f"Grouter at {path} has a config.json that was edited after saving (its "
                        f"{CONFIG_CHECKSUM} differs): its architecture, tokenizer or tensor checksum no "
                        "longer describe the trained weights; restore the original config.json, or distill "
                        "a Grouter with the settings you want")


def upgrade_checkpoint(directory: str | os.PathLike) -> Path:
    """Re-save a Grouter saved before config checksums (all other checks run on load)."""
    model, info = load_grouter(directory)
    return save_grouter(model, directory, info.provenance, info.tokenizer)


def grouter_fingerprint(directory: str | os.PathLike) -> str:
    """sha256 over config.json and model.safetensors: changes whenever the Grouter does."""
    path = Path(directory)
    read_grouter_header(path)
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, TENSORS_FILE):
        digest.update(f"{name}:{(path / name).stat().st_size}:".encode())
        with open(path / name, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _header_config(path: Path, header: dict[str, Any]) -> GrouterConfig:
    if not isinstance(header.get("architecture"), dict):
        _bad(path, "has no architecture object in config.json")
    architecture = header["architecture"]
    if "causal" not in architecture:
        # Written before GrouterConfig.causal existed: its MHA encoder had no causal mask.
        architecture = {**architecture, "causal": False}
        log.info("Grouter at %s predates the causal flag: loaded as bidirectional (causal=false), "
                 "as it was trained", path)
    try:
        config = GrouterConfig.from_dict(architecture)
    except (UserError, TypeError) as error:
        raise UserError(f"Grouter at {path} has an invalid architecture: {error}") from None
    if header.get("num_experts") != config.num_experts:
        _bad(path, f"says num_experts={header.get('num_experts')!r} but its architecture has "
                   f"{config.num_experts}")
    return config


def _bad(path: Path, problem: str):
    raise UserError(f"Grouter checkpoint {path} {problem}; it is incomplete or corrupted, save it again")


def _checked_tokenizer(fingerprint: dict[str, Any], config: GrouterConfig) -> dict[str, Any]:
    if not isinstance(fingerprint, dict) or not {"vocab_size", "sha256"} <= set(fingerprint):
        raise UserError("tokenizer_fingerprint must be a dict with vocab_size and sha256 "
                        "(Tokenizer.fingerprint())")
    vocab_size = fingerprint["vocab_size"]
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise UserError(f"tokenizer vocab_size={vocab_size!r} must be a positive integer")
    if vocab_size > config.vocab_size:
        raise UserError(f"the tokenizer has {vocab_size} tokens but the Grouter's embedding only "
                        f"{config.vocab_size}; build the Grouter with vocab_size >= {vocab_size}")
    return {"vocab_size": vocab_size, "sha256": str(fingerprint["sha256"])}


def _check_same_tokenizer(path: Path, stored: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in ("vocab_size", "sha256"):
        if stored.get(key) != expected.get(key):
            raise UserError(
                f"Grouter at {path} was made with another tokenizer (vocab_size={stored.get('vocab_size')}, "
                f"sha256={str(stored.get('sha256'))[:12]}) than the data's (vocab_size="
                f"{expected.get('vocab_size')}, sha256={str(expected.get('sha256'))[:12]}); tokenize the "
                "data with the Grouter's tokenizer or distill a Grouter with this one")


def _complete_provenance(provenance: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(provenance, dict):
        raise UserError(f"Grouter provenance must be a dict, got {type(provenance).__name__}")
    complete = {**new_provenance(), **provenance}
    if not isinstance(complete["history"], list):
        raise UserError("Grouter provenance history must be a list of step records")
    return complete


def _expected_tensor_specs(config: GrouterConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with torch.device("meta"):
        reference = Grouter(config)
    return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in reference.state_dict().items()}


def _tensors_to_save(model: Grouter) -> dict[str, torch.Tensor]:
    specs = _expected_tensor_specs(model.config)
    state = model.state_dict()
    if set(state) != set(specs):
        raise UserError(f"model tensors {sorted(set(state) ^ set(specs))} do not match its config; "
                        "save a Grouter built from its own config")
    tensors = {}
    for name, (shape, dtype) in specs.items():
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise UserError(f"model tensor {name} has shape {tuple(tensor.shape)} but its config implies "
                            f"{shape}; update the config before saving")
        tensors[name] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    return tensors


def _read_tensors(path: Path, expected_sha256: Any) -> dict[str, torch.Tensor]:
    data = (path / TENSORS_FILE).read_bytes()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        _bad(path, f"has a {TENSORS_FILE} whose checksum differs from config.json (truncated or altered)")
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        _bad(path, f"has an unreadable {TENSORS_FILE} ({str(error).splitlines()[0] if str(error) else error})")


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], config: GrouterConfig) -> None:
    specs = _expected_tensor_specs(config)
    missing, unexpected = sorted(set(specs) - set(tensors)), sorted(set(tensors) - set(specs))
    if missing or unexpected:
        _bad(path, f"does not match its config (missing tensors {missing[:4]}, unexpected {unexpected[:4]})")
    for name, (shape, dtype) in specs.items():
        if tuple(tensors[name].shape) != shape or tensors[name].dtype != dtype:
            _bad(path, f"has tensor {name} of {tensors[name].dtype} {tuple(tensors[name].shape)} but its "
                       f"config implies {dtype} {shape}")


def _refuse_foreign_directory(target: Path) -> None:
    """Only an empty directory or an existing Grouter checkpoint may be replaced."""
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"{target} exists and is not a directory; choose another Grouter output path")
    if not any(target.iterdir()):
        return
    try:
        is_grouter = json.loads((target / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        is_grouter = False
    if not is_grouter:
        raise UserError(f"{target} exists and is not a Grouter checkpoint; refusing to overwrite it, "
                        "choose another output directory")


def main(argv: list[str] | None = None) -> int:
    """python -m megatron_grouter.grouter.checkpoint upgrade DIR: add the config checksum."""
    import argparse
    import sys

    from megatron_grouter.app import command_status

    parser = argparse.ArgumentParser(prog="python -m megatron_grouter.grouter.checkpoint")
    parser.add_argument("action", choices=["upgrade"])
    parser.add_argument("directory")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return command_status(lambda: print(f"upgraded {upgrade_checkpoint(args.directory)}"))


if __name__ == "__main__":
    raise SystemExit(main())
