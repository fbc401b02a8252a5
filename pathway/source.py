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

import copy
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
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
        bytes_read: bytes read so far (whole tensors, or the rows of them a selection keeps).
        tensors_read: names read so far, in order (a name read twice is listed twice).
    """

    path: Path
    model: nn.Module
    keys: dict[str, tuple[Path, str]]
    sizes: dict[str, int]
    bytes_read: int = 0
    tensors_read: list[str] = field(default_factory=list)

    def read(self, names: Iterable[str], rows: Mapping[str, torch.Tensor | None] | None = None
             ) -> dict[str, torch.Tensor]:
        """The named aux tensors (plain parameter names), as stored (dtype of the file), on the CPU.

        ``rows`` may give, per name, the sorted rows (first dimension) to read instead of the whole
        tensor: they are read as runs of consecutive rows (safetensors slices) and returned stacked.
        """
        from safetensors import SafetensorError, safe_open  # here: ``import pathway`` loads torch alone

        out = {}
        for name in names:
            file, key = self._where(name)
            keep = rows.get(name) if rows is not None else None
            try:
                with safe_open(str(file), "pt") as f:   # one open per tensor: see the module docstring
                    if keep is None:
                        tensor = f.get_tensor(key)
                    else:
                        tensor = _read_rows(f.get_slice(key), keep)
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
            raise SourceError(f"{self.path} holds no tensor for aux weight '{name}' of {type(self.model).__name__}: "
                              f"a shard is missing, or the files hold another architecture than the one built; "
                              f"save the model again, or leave the weight out (exclude=[...])") from None


def _read_rows(piece: object, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (sorted) of a safetensors slice, one strided slice per arithmetic run, into one tensor.

    A selection's rows are evenly spaced (every other head dimension, every 8/3-th channel), so runs of
    equal steps are long and few slices are read; the output is allocated once and each run copied
    into it, so the transient is one run, not a list of them.
    """
    first = piece[0:1]
    out = torch.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
    at = 0
    for start, stop, step in _progressions(rows.tolist()):
        count = len(range(start, stop, step))
        out[at:at + count] = piece[start:stop:step]
        at += count
    return out


def _progressions(rows: list[int]) -> list[tuple[int, int, int]]:
    """Sorted row numbers as ``(start, stop, step)`` runs of equal steps, taken greedily."""
    runs, i = [], 0
    while i < len(rows):
        if i + 1 == len(rows):
            runs.append((rows[i], rows[i] + 1, 1))
            break
        step, j = rows[i + 1] - rows[i], i + 1
        while j + 1 < len(rows) and rows[j + 1] - rows[j] == step:
            j += 1
        runs.append((rows[i], rows[j] + 1, step))
        i = j + 1
    return runs


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def open_aux(path: str | os.PathLike, architecture: Architecture = None) -> AuxSource:
    """Open an aux model on disk without loading it: see the module docstring for what ``path`` may be.

    Raises:
        SourceError: the path is missing, holds no safetensors weights, needs ``architecture``, its
            config.json cannot be read or built, or a tensor in the files has another shape than the
            model built from the config (the tensor, both shapes and the config key are named). A tensor
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
    keys, shapes, sizes = _file_keys(files)
    table = _key_map(model, keys, path)
    _check_shapes(model, table, shapes, architecture)
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
    file = path / "config.json"
    try:
        declared = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{file} is not valid JSON ({e}): repair it, or write it again from the model "
                          f"(model.config.save_pretrained(folder))") from e
    if not isinstance(declared, dict):
        raise SourceError(f"{file} holds a JSON {type(declared).__name__}, not the object of a Hugging Face config")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):
            return AutoModel.from_config(config)
    except (ValueError, KeyError, OSError) as e:   # transformers' words for a config it cannot build
        kind = declared.get("model_type")
        raise SourceError(f"{file}: transformers cannot build a model from it (model_type {kind!r}): "
                          f"{str(e).splitlines()[0]} Fix model_type / the config, upgrade transformers if the "
                          f"architecture is newer than it, or pass architecture=... (an nn.Module built under "
                          f"torch.device('meta'))") from e


def _build(architecture: Architecture) -> nn.Module:
    if isinstance(architecture, nn.Module):
        return architecture
    if isinstance(architecture, str):
        try:
            import timm
        except ImportError as e:
            raise SourceError(f"architecture={architecture!r} names a timm model, which needs timm installed") from e
        if not timm.is_model(architecture):
            raise SourceError(f"architecture={architecture!r} is not a timm model name (timm {timm.__version__}); "
                              f"timm.list_models('{architecture.split('_')[0]}*') lists the names it knows, or pass "
                              f"an nn.Module built under torch.device('meta')")
        with torch.device("meta"):
            return timm.create_model(architecture, pretrained=False)
    if callable(architecture):
        with torch.device("meta"):
            model = architecture()
        if isinstance(model, nn.Module):
            return model
    raise SourceError(f"architecture must be a timm model name, an nn.Module or a callable returning one, "
                      f"not {type(architecture).__name__}")


def _file_keys(files: list[Path]) -> tuple[dict[str, Path], dict[str, torch.Size], dict[str, int]]:
    """Every key of ``files`` -> its file, its shape and its size in bytes (headers only: no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    keys: dict[str, Path] = {}
    shapes: dict[str, torch.Size] = {}
    sizes: dict[str, int] = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    keys[key] = file
                    shapes[key] = torch.Size(piece.get_shape())
                    sizes[key] = shapes[key].numel() * _DTYPE_BYTES.get(piece.get_dtype(), 4)
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{file}: not a readable safetensors file: {e}") from e
    return keys, shapes, sizes


def _check_shapes(model: nn.Module, table: dict[str, tuple[Path, str]], shapes: dict[str, torch.Size],
                  architecture: Architecture) -> None:
    """Refuse files whose tensors do not have the shapes of the model built for them.

    The plan reads the meta model's shapes and selects rows by them; a file holding other shapes (a
    config.json that says ``intermediate_size: 768`` beside 1024-row tensors) would be read wrongly
    without a word.
    """
    params = plain_parameters(model)
    wrong = [(name, key, file, params[name].shape, shapes[key]) for name, (file, key) in table.items()
             if params[name].shape != shapes[key]]
    if not wrong:
        return
    name, key, file, built, stored = wrong[0]
    config = getattr(model, "config", None)
    if architecture is None and config is not None:
        blame = _config_fix(model, config, built, stored, {n: shapes[k] for n, (_, k) in table.items()})
        fix = (f"config.json says {blame}" if blame else
               "make config.json agree with the files (use the config saved with these weights)")
        where = "the model built from config.json"
    else:
        where, fix = "the architecture given", "pass the architecture these weights were saved from"
    raise SourceError(f"{file}: tensor '{key}' (aux weight '{name}') is {list(stored)} in the file but "
                      f"{list(built)} in {where}; {len(wrong)} of {len(table)} tensors disagree. Fix: {fix}")


def _config_fix(model: nn.Module, config: object, built: torch.Size, stored: torch.Size,
                stored_shapes: dict[str, torch.Size]) -> str:
    """Which config.json entry makes the model disagree with its files, and the value that fits them.

    Candidates come from the first differing dimension: an entry equal to the built size
    (``intermediate_size``), or one that divides it and scales to a whole number for the stored size
    (``num_key_value_heads`` times the head size); each is tried on the meta device and named only if
    the model it builds has every stored shape.
    """
    if len(built) != len(stored):
        return ""
    made, found = next((m, f) for m, f in zip(built, stored) if m != f)
    values = {k: v for k, v in config.to_dict().items() if isinstance(v, int) and not isinstance(v, bool) and v > 1}
    exact = [(k, found) for k, v in values.items() if v == made]
    scaled = [(k, v * found // made) for k, v in values.items() if made % v == 0 and (v * found) % made == 0]
    for key, value in exact or scaled:
        trial = copy.deepcopy(config)
        setattr(trial, key, value)
        try:
            with torch.device("meta"):
                params = plain_parameters(type(model)(trial))
        except Exception:  # an architecture rejecting the value: then it is not the fix
            continue
        if all(n in params and params[n].shape == shape for n, shape in stored_shapes.items()):
            return f"{key} = {values[key]} but the files hold a model with {key} = {value}"
    return ""
    values = {k: v for k, v in config.to_dict().items() if isinstance(v, int) and not isinstance(v, bool) and v > 1}
    for made, found in zip(built, stored):
        if made == found:
            continue
        exact = [f"{k} = {v} (the files need {found})" for k, v in values.items() if v == made]
        if exact:
            return " / ".join(exact)
        scaled = [f"{k} = {v} (the files need {v * found // made})" for k, v in values.items()
                  if made % v == 0 and (v * found) % made == 0]
        return " / ".join(scaled)
    return ""


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
