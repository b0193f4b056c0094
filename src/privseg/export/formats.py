"""The export formats, one registry (:func:`export_format`, the :func:`privseg.utils.registrar`
idiom): a format is where its network file, model card and manifest lie in the export folder, how
the network is written and read back, and any files of its own. A new format is one registration::

    export_format("torchscript", network="model.ts", read_network=load_torchscript)(write_torchscript)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from privseg.export import bundle as bundle_mod
from privseg.export.artifacts import OnnxNetwork, load_torchscript, write_onnx, write_torchscript
from privseg.utils import atomic_path, registrar, write_json

MANIFEST = "export.json"  # a format's manifest unless it names its own
BUNDLE_WEIGHTS = "models/model.pt"  # a MONAI bundle's weights, read by MONAI's CheckpointLoader


@dataclass(frozen=True)
class ExportFormat:
    """One export format; paths are relative to the export folder."""

    name: str
    network: str  # the network file
    write_network: Callable[[torch.nn.Module, dict, Path], Path]  # (model, training config, path)
    read_network: Callable[[Path], object] | None  # the network read back; None: privseg runs ``weights`` itself
    card: str = "README.md"  # the model card (Markdown; model_card.html beside it)
    manifest: str = MANIFEST
    own_files: Callable[[Path, dict, dict], None] | None = None  # (folder, checkpoint payload, preprocessing)
    weights: str | None = None  # a privseg checkpoint of the weights, checked with the network before a run


FORMATS: dict[str, ExportFormat] = {}


def export_format(name: str, **fields) -> Callable[[object], object]:
    """Files the export format ``name``: decorates its network writer ``(model, config, path)``;
    ``fields`` are the rest of :class:`ExportFormat`. A name taken already is refused."""
    return registrar(FORMATS, name, kind="export format",
                     entry=lambda write: ExportFormat(name, write_network=write, **fields))


def _bundle_files(folder: Path, payload: dict, prep: dict) -> None:
    """A MONAI bundle's own files: the weights as a privseg checkpoint (MONAI's CheckpointLoader
    reads its "model" entry; no optimizer), the inference config and the logging config."""
    weights = {k: payload[k] for k in ("format", "model", "config", "step", "versions", "extra") if k in payload}
    with atomic_path(folder / BUNDLE_WEIGHTS) as t:
        torch.save(weights, t)
    write_json(folder / "configs" / "inference.json",
               bundle_mod.inference_config(payload["config"], prep["modality"], prep["window"], prep["labels"]))
    (folder / "configs" / "logging.conf").write_text(bundle_mod.LOGGING_CONF)


# the order here is the order `privseg export --help` lists them
export_format("monai-bundle", network="models/model.ts", read_network=None, card="docs/README.md",
              manifest="configs/metadata.json",  # MONAI's bundle metadata
              own_files=_bundle_files, weights=BUNDLE_WEIGHTS)(write_torchscript)
export_format("torchscript", network="model.ts", read_network=load_torchscript)(write_torchscript)
export_format("onnx", network="model.onnx", read_network=OnnxNetwork)(write_onnx)
