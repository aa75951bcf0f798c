"""Audit a user's already-trained autoencoder, without training: load it safely, reconstruct
the spec's test images, and build the same per-sample table an audit builds.

Three ways in, none of which unpickles arbitrary objects:
  * a state_dict file plus `--model-factory package.module:function` (a function or class,
    called with no arguments, returning the nn.Module): read with torch.load(weights_only=True),
    which refuses any pickle that would build objects other than tensors and containers;
  * a TorchScript file (torch.jit.save) or a torch.export file (torch.export.save): a graph
    and its weights, no Python pickles of user classes. An export traced with a fixed batch size
    is fed batches of exactly that size.

Which images are held out: the spec's test split (for an image folder, 20% of the files chosen
with `split_seed`, stratified by group with --labels, or the labels CSV's split column);
`fairrecon split` lists them. A model trained on some of them is scored partly on its own
training images: `audit_model(trained_on=...)` warns.
"""

from __future__ import annotations

import importlib
import os
import pickle
import pickletools
import sys
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .errors import UserError
from .grid import Cell
from .measure import sample_errors
from .memory import resolve_device
from .results import AuditResult
from .resultsdir import input_fingerprint
from .spec import AuditSpec


def load_factory(target: str):
    """'package.module:function' -> the callable (the current folder is importable, as with python -m)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise UserError(f"--model-factory '{target}' must look like package.module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--model-factory: cannot import '{module_name}' ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"--model-factory: module '{module_name}' has no attribute '{attr}'") from None


SAVE_HOW = (
    "save its weights with torch.save(model.state_dict(), FILE) and pass --model-factory package.module:function "
    "that builds the model, or save the whole model as a graph: torch.export.save(torch.export.export(model, "
    "(images,)), FILE) or TorchScript"
)
# What a state_dict's pickle refers to: containers and torch's tensor rebuilders. Anything else it names
# (a class such as mymodels.AE or torch.nn.Linear) is an object pickled whole.
_STATE_DICT_GLOBALS = ("collections.", "builtins.", "__builtin__.", "torch._utils.", "torch.serialization.")


def pickled_class(path: str | Path) -> str | None:
    """The class a torch.save file pickles whole (e.g. '__main__.AE' for torch.save(model)), read from the
    pickle's opcodes without running them; None for a state_dict, a file that is not a torch.save zip,
    or one that cannot be read."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if _graph_archive(names):
                return None
            name = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
            data = z.read(name) if name else b""
    except (OSError, zipfile.BadZipFile, KeyError):
        return None
    strings: list[str] = []
    named: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name == "GLOBAL":
                named.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                named.append(f"{strings[-2]}.{strings[-1]}")
    except (ValueError, EOFError):
        return None
    classes = [g for g in named if not g.startswith(_STATE_DICT_GLOBALS) and not _is_storage(g)]
    own = [g for g in classes if not g.startswith("torch.")]  # the user's class, not its torch.nn parts
    return (own or classes or [None])[0]


def _graph_archive(names: list[str]) -> bool:
    """A zip's member names are those of a TorchScript or torch.export file (a graph, not a pickled object)."""
    return any(n.endswith(("constants.pkl", "/archive_format")) or "/code/" in n for n in names)


def _is_graph(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return _graph_archive(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _is_storage(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    return module == "torch" and (attr.endswith("Storage") or attr in ("device", "Size") or attr in _DTYPES)


_DTYPES = {str(t).removeprefix("torch.") for t in vars(torch).values() if isinstance(t, torch.dtype)}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict (name -> tensor) read with weights_only=True; anything else is a one-line UserError."""
    path = Path(path)
    if _is_graph(path):
        raise UserError(f"{path}: a TorchScript or torch.export file, which holds its own model: drop --model-factory")
    whole = pickled_class(path)
    if whole is not None:
        raise UserError(_pickled_object(path, whole))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: weights file not found") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, OSError) as e:
        raise UserError(
            f"{path}: refused to load (not a plain state_dict of tensors; "
            f"torch.load weights_only=True says: {_brief(e)}); {SAVE_HOW}"
        ) from None
    if isinstance(state, Mapping) and state and all(isinstance(k, str) for k in state):
        nested = [k for k, v in state.items() if isinstance(v, Mapping) and _is_state_dict(v)]
        if nested and not _is_state_dict(state):
            raise UserError(
                f"{path}: a checkpoint dict (keys {', '.join(map(str, list(state)[:5]))}), not a state_dict; "
                f"its '{nested[0]}' entry looks like one: save it alone, torch.save(checkpoint['{nested[0]}'], FILE)"
            )
    if not _is_state_dict(state):
        raise UserError(
            f"{path}: not a state_dict (expected a dict of parameter name -> tensor, "
            f"got {type(state).__name__}); save with torch.save(model.state_dict(), FILE)"
        )
    return dict(state)


def _pickled_object(path: Path, cls: str) -> str:
    return (
        f"{path}: refused, it pickles a {cls} object, not only tensors (torch.save(model) pickles the whole model); fairrecon "
        f"does not unpickle objects, since loading one runs the pickle's code: {SAVE_HOW}"
    )


def _is_state_dict(state: object) -> bool:
    return (
        isinstance(state, Mapping)
        and bool(state)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    )


def load_model(weights: str | Path, factory: str | None = None) -> nn.Module:
    """The user's model: factory + state_dict, or a TorchScript / torch.export file (factory None).

    Loading is quiet: torch's warnings are captured. A file that loads as neither format is one
    line saying what was tried and why each failed. A torch.export program traced with a fixed
    batch size is run at that batch size (see `FixedBatch`).
    """
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"{weights}: model file not found")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation and serialization notes are not the user's concern
        if factory is not None:
            return _from_factory(weights, factory)
        return _from_archive(weights)


def _from_factory(weights: Path, factory: str) -> nn.Module:
    state = load_state_dict(weights)
    build = load_factory(factory)
    try:
        model = build()
    except Exception as e:  # the user's own code: report it in one line
        raise UserError(f"--model-factory {factory}: calling it failed ({type(e).__name__}: {_brief(e)})") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model-factory {factory} returned {type(model).__name__}, not a torch.nn.Module")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{weights}: does not fit the factory's model ({_brief(e)})") from None
    return model.eval()


def _from_archive(weights: Path) -> nn.Module:
    """TorchScript, then torch.export; a state_dict (also a zip) is recognised and sent to --model-factory."""
    if not zipfile.is_zipfile(weights):
        raise UserError(
            f"{weights}: not a TorchScript or torch.export file (both are zip archives, this is not); "
            "for a state_dict also pass --model-factory package.module:function"
        )
    with zipfile.ZipFile(weights) as z:
        names = z.namelist()
    if any(n.endswith("/data.pkl") for n in names) and not _graph_archive(names):
        whole = pickled_class(weights)
        if whole is not None:
            raise UserError(_pickled_object(weights, whole))
        raise UserError(
            f"{weights}: a torch.save file (a state_dict?), not TorchScript or torch.export; for a "
            "state_dict also pass --model-factory package.module:function that builds its model"
        )
    tried = []
    try:
        return torch.jit.load(str(weights), map_location="cpu").eval()
    except Exception as e:  # torch.jit raises assorted types for a foreign archive
        tried.append(f"TorchScript: {_brief(e, 100)}")
    try:
        program = torch.export.load(str(weights))
    except Exception as e:
        tried.append(f"torch.export: {_brief(e, 100)}")
        raise UserError(
            f"{weights}: cannot load the model ({'; '.join(tried)}); for a state_dict also pass "
            "--model-factory package.module:function"
        ) from None
    batch = fixed_batch(program)
    return FixedBatch(program.module(), batch) if batch is not None else program.module()


def fixed_batch(program) -> int | None:
    """The batch size a torch.export program was traced with, when it is fixed (an int, not a symbol)."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and isinstance(value.shape[0], int):
                return int(value.shape[0])
    return None


class FixedBatch(nn.Module):
    """Runs a model traced for batches of exactly `batch` images: the last batch is padded (by
    repeating its last image) and the padding's outputs dropped, so every image is reconstructed once."""

    def __init__(self, model: nn.Module, batch: int):
        super().__init__()
        self.model, self.batch = model, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for i in range(0, len(x), self.batch):
            xb = x[i : i + self.batch]
            n = len(xb)
            if n < self.batch:
                xb = torch.cat([xb, xb[-1:].expand(self.batch - n, *xb.shape[1:])])
            outputs.append(self.model(xb)[:n])
        return torch.cat(outputs)


def _brief(e: BaseException, width: int = 160) -> str:
    """An exception as one short line: its first non-empty line that says something, shortened at a
    word boundary (never mid-word)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    informative = [line for line in lines if not line.lower().startswith(("weights only load failed", "error(s) in"))]
    line = (informative or lines or [type(e).__name__])[0]
    return line if len(line) <= width else line[:width].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


class _OneModel:
    """Duck-types stacked.StackedCells for measure.sample_errors: one cell, the user's model."""

    def __init__(self, model: nn.Module, name: str):
        self.model, self.cells = model, [Cell(name, 0)]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        parts = []
        for i in range(0, len(x), chunk):
            xb = x[i : i + chunk]
            try:
                out = self.model(xb)
            except Exception as e:  # the user's model: a shape it was not built for, its own bug
                raise UserError(
                    f"the model failed on images of shape {tuple(xb.shape)} ({type(e).__name__}: {_brief(e)})"
                ) from None
            if not isinstance(out, torch.Tensor) or out.numel() != xb.numel():
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise UserError(
                    f"the model maps images {tuple(xb.shape)} to {got}; an autoencoder must "
                    "return a tensor of the same shape"
                )
            parts.append(out.reshape(xb.shape).float())
        return torch.cat(parts)[None]  # (1, N, ...)


def audit_model(
    model: nn.Module,
    spec: AuditSpec,
    name: str = "model",
    device: str = "cpu",
    *,
    trained_on: str | Iterable[str] | None = None,
) -> AuditResult:
    """Score a trained autoencoder on the spec's grouped test images: an AuditResult with one cell.

    `trained_on` is what the model was trained on, if the user says: "all" (every image of the
    dataset) or the files (image folders) or indices it saw. Test images among them are scored on
    their own training images, and `result.info["warnings"]` says so.
    """
    from .data import load_images_for
    from .groups import make_groups, split_table

    dev = resolve_device(device)
    spec = spec.replace(losses=(name,), seeds=1)
    images = load_images_for(spec)
    data = make_groups(images, spec)
    samples = sample_errors(_OneModel(model.to(dev), name), data, dev)
    cells = pd.DataFrame({"loss": [name], "seed": [0], "status": ["ok"]})
    history = pd.DataFrame(columns=["loss", "seed", "epoch", "train_nll", "train_mse"])
    test_keys = [images.files[i] if images.files else str(i) for i in data.test_index.tolist()]
    info = {
        "external_model": name,
        "device": str(dev),
        "inputs": input_fingerprint(spec),
        "warnings": _seen_warnings(test_keys, trained_on),
        "test_images_trained_on": len(_seen(test_keys, trained_on)),  # the gate refuses these (gate.check)
    }
    return AuditResult(spec, samples, cells, data.describe(), history, info, split=split_table(images, data))


def _seen(test_keys: list[str], trained_on: str | Iterable[str] | None) -> set[str]:
    """The test images the model was trained on, as far as `trained_on` says."""
    if trained_on is None:
        return set()
    return set(test_keys) if trained_on == "all" else set(test_keys) & {str(k) for k in trained_on}


def _seen_warnings(test_keys: list[str], trained_on: str | Iterable[str] | None) -> list[str]:
    """A warning when the model saw some of the test images it is scored on."""
    seen = _seen(test_keys, trained_on)
    if not seen:
        return []
    example = sorted(seen)[0]
    return [
        f"the model was trained on {len(seen)} of the {len(test_keys)} test images it is scored on "
        f"(e.g. {example}): their errors are training errors, not held-out errors, so the gap may be "
        "understated; train on the split's train files only (split.csv)"
    ]
