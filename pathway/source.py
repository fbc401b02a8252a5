"""An aux model on disk, read lazily: its structure on the meta device, only the matched tensors read.

A 7B language model as aux costs ~14 GB in bf16 when loaded, while a ViT-B target takes a few
percent of it through its pathways. :func:`open_aux` builds the aux model on the **meta device**
(shapes only, no memory) so that ``plan`` can read its graph there, and :meth:`AuxSource.read`
reads only the tensors a pair needs, each with its own ``safetensors.safe_open``: one open file
keeps every page it has read mapped (and counted in the RSS) until it closes, so opening per tensor
bounds the peak at one aux tensor (measured: reading 12 tensors of 32 MiB raised the peak by
~460 MiB through one open file and by ~105 MiB with one open per tensor).

What a path may be:

* a Hugging Face model directory: ``config.json`` and ``model.safetensors``, or shards listed in
  ``model.safetensors.index.json``; the model is ``AutoModel.from_config`` (``transformers`` is
  imported only then);
* a safetensors file with ``architecture``: a timm model name (``"vit_base_patch16_224"``, built by
  ``timm.create_model`` on meta), an ``nn.Module`` of that architecture (its own weights are
  ignored; build it under ``torch.device("meta")`` to spend nothing), or a callable returning one:
  this also covers the engine's exported checkpoints (``TransformerModel`` keys) and any file whose
  keys are the module's parameter names, with or without a common prefix (``model.`` for a
  ``*ForCausalLM`` file read into its base model).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import PathwayError
from .modules import plain_parameters

Architecture = None | str | nn.Module | Callable[[], nn.Module]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SourceError(PathwayError):
    """An aux path that cannot be read lazily: missing files, an unknown format, tensors it lacks."""


@dataclass
class AuxSource:
    """An aux model whose tensors stay on disk until :meth:`read` asks for them.

    Attributes:
        path: the directory or file it was opened from.
        model: the aux ``nn.Module`` on the meta device (structure and shapes only), for ``plan``.
        keys: plain parameter name of ``model`` -> (safetensors file, key in that file).
        sizes: plain parameter name -> bytes it takes in its file (from the file headers).
        bytes_read: bytes of every tensor read so far (what ``read`` took from disk).
        tensors_read: names read so far, in order (a name read twice is listed twice).
    """

    path: Path
    model: nn.Module
    keys: dict[str, tuple[Path, str]]
    sizes: dict[str, int]
    bytes_read: int = 0
    tensors_read: list[str] = field(default_factory=list)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named aux tensors (plain parameter names), as stored (dtype of the file), on the CPU."""
        from safetensors import SafetensorError, safe_open  # here: ``import pathway`` loads torch alone

        out = {}
        for name in names:
            file, key = self._where(name)
            try:
                with safe_open(str(file), "pt") as f:   # one open per tensor: see the module docstring
                    tensor = f.get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise SourceError(f"{file}: cannot read tensor '{key}' (aux weight '{name}'): {e}") from e
            self.bytes_read += tensor.numel() * tensor.element_size()
            self.tensors_read.append(name)
            out[name] = tensor
        return out

    def nbytes(self, names: Iterable[str]) -> int:
        """Bytes :meth:`read` would take from disk for ``names``, each counted once."""
        unique = list(dict.fromkeys(names))
        for name in unique:
            self._where(name)
        return sum(self.sizes[n] for n in unique)

    def describe_reads(self, names: Iterable[str]) -> str:
        """One line for a dry run: how many tensors, bytes and files a connect would read, of how many."""
        names = list(dict.fromkeys(names))
        files = sorted({self._where(n)[0].name for n in names})
        everything = self.nbytes(self.keys)
        part = self.nbytes(names)
        return (f"reads {len(names)} of {len(self.keys)} aux tensors from {self.path}: {_size(part)} of "
                f"{_size(everything)} ({100 * part / max(everything, 1):.3g}%), in {len(files)} file(s) "
                f"{', '.join(files)}")

    def _where(self, name: str) -> tuple[Path, str]:
        try:
            return self.keys[name]
        except KeyError:
            raise SourceError(f"{self.path} holds no tensor for aux weight '{name}' of {type(self.model).__name__}"
                              ) from None


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def open_aux(path: str | os.PathLike, architecture: Architecture = None) -> AuxSource:
    """Open an aux model on disk without loading it: see the module docstring for what ``path`` may be.

    Raises:
        SourceError: the path is missing, holds no safetensors weights, or needs ``architecture``. A tensor
            of the model that the files lack is named by a SourceError when ``connect`` asks to read it.
    """
    path = Path(path)
    if not path.exists():
        raise SourceError(f"aux path {path} does not exist")
    if path.is_dir():
        files = _directory_files(path)
    elif architecture is None:
        raise SourceError(f"{path} is a single weights file: pass the architecture it holds, "
                          f"open_aux(path, architecture='vit_base_patch16_224') (a timm name), an nn.Module "
                          f"built under torch.device('meta'), or a callable returning one")
    elif path.suffix != ".safetensors":
        raise SourceError(f"{path}: only safetensors files can be read tensor by tensor; convert the checkpoint "
                          f"first (safetensors.torch.save_file(torch.load(file, weights_only=True), "
                          f"'model.safetensors'))")
    else:
        files = [path]
    model = _build(architecture) if architecture is not None else _from_config(path)
    keys, sizes = _file_keys(files)
    table = _key_map(model, keys, path)
    return AuxSource(path, model.eval(), table, {name: sizes[key] for name, (_, key) in table.items()})


def _directory_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SourceError(f"{index}: not a safetensors index (a JSON object with 'weight_map'): {e}") from e
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SourceError(f"{index} lists shard(s) {missing} that are not in {path}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise SourceError(f"{path} holds no {SINGLE_FILE} or {INDEX_FILE}" + (
        f" (and {len(found)} other safetensors files: which one?)" if found else
        "; a directory of .bin/.pt weights must be converted to safetensors first"))


def _from_config(path: Path) -> nn.Module:
    if not (path / "config.json").is_file():
        raise SourceError(f"{path}: a Hugging Face model directory needs config.json (or pass architecture=...)")
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as e:
        raise SourceError(f"{path}: building a Hugging Face model from config.json needs the transformers "
                          f"package (pip install transformers)") from e
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with torch.device("meta"):
        return AutoModel.from_config(config)


def _build(architecture: Architecture) -> nn.Module:
    if isinstance(architecture, nn.Module):
        return architecture
    if isinstance(architecture, str):
        try:
            import timm
        except ImportError as e:
            raise SourceError(f"architecture={architecture!r} names a timm model, which needs timm installed") from e
        with torch.device("meta"):
            return timm.create_model(architecture, pretrained=False)
    if callable(architecture):
        with torch.device("meta"):
            model = architecture()
        if isinstance(model, nn.Module):
            return model
    raise SourceError(f"architecture must be a timm model name, an nn.Module or a callable returning one, "
                      f"not {type(architecture).__name__}")


def _file_keys(files: list[Path]) -> tuple[dict[str, Path], dict[str, int]]:
    """Every key of ``files`` -> its file, and -> its size in bytes (headers only: no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    keys: dict[str, Path] = {}
    sizes: dict[str, int] = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    keys[key] = file
                    sizes[key] = torch.Size(piece.get_shape()).numel() * _DTYPE_BYTES.get(piece.get_dtype(), 4)
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{file}: not a readable safetensors file: {e}") from e
    return keys, sizes


def _key_map(model: nn.Module, keys: dict[str, Path], path: Path) -> dict[str, tuple[Path, str]]:
    """Model parameter name -> (file, key): the same name, or one common prefix added or dropped."""
    names = list(plain_parameters(model))
    rewrites: Counter[tuple[str, str]] = Counter()
    for name in names:
        if name in keys:
            rewrites["", ""] += 1
            continue
        for key in keys:
            if key.endswith("." + name):
                rewrites["add", key[: -len(name)]] += 1
            elif name.endswith("." + key):
                rewrites["drop", name[: -len(key)]] += 1
    if not rewrites:
        raise SourceError(f"{path}: none of its {len(keys)} tensors has a name of {type(model).__name__}'s "
                          f"parameters (e.g. file {list(keys)[:3]} vs model {names[:3]}): is it the right "
                          f"architecture?")
    how, prefix = rewrites.most_common(1)[0][0]
    table = {}
    for name in names:
        key = name if how == "" else prefix + name if how == "add" else name[len(prefix):]
        if key in keys:
            table[name] = (keys[key], key)
        elif name in keys:
            table[name] = (keys[name], name)
    return table
