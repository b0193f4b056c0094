"""The network outside privseg: TorchScript and ONNX files, each checked against the model it came
from, and loaded back as a predictor for privseg's own sliding window.

Both files hold the network for one sliding-window patch (``(N, C, *patch_size)``, N free):
sliding-window inference only ever feeds windows of the patch size (smaller images are padded), so
tracing at that size is exact, and the branches a traced network takes (the U-Net's odd-size
padding, the ResNet's resize back) are the ones every window takes.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from privseg.errors import CheckpointError, ConfigError
from privseg.utils import atomic_path

ONNX_OPSET = 17
# |exported - PyTorch| allowed on logits; float32 kernels differ in summation order only
TOLERANCE = 1e-3


def example_input(config: dict, batch: int = 2) -> torch.Tensor:
    """A random window of the model's patch size (the shape every exported file is checked on)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn((batch, int(config["in_channels"]), *map(int, config["patch_size"])), generator=gen)


def _check_close(what: str, got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    err = float((torch.as_tensor(got) - want).abs().max())
    if not err <= TOLERANCE:
        raise ConfigError(f"network {name!r} is not supported by the {what} export: its output differs from the "
                          f"PyTorch model by {err:.3g} (more than {TOLERANCE:g})")


def write_torchscript(model: torch.nn.Module, config: dict, path: str | os.PathLike) -> Path:
    """Trace ``model`` (eval mode) at the patch size, check it on another batch size, save it."""
    model = model.eval()
    x = example_input(config)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, x[:1], check_trace=False)
            _check_close("TorchScript", traced(x), model(x), config["model"])
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"network {config['model']!r} cannot be exported to TorchScript ({str(exc)[:300]})") from None
    with atomic_path(path) as tmp:
        torch.jit.save(traced, str(tmp))
    return Path(path)


def write_onnx(model: torch.nn.Module, config: dict, path: str | os.PathLike) -> Path:
    """Export ``model`` to ONNX (batch axis free) and check it with onnxruntime on the CPU."""
    model = model.eval()
    x = example_input(config)
    try:
        with torch.no_grad(), warnings.catch_warnings(), atomic_path(path) as tmp:
            warnings.simplefilter("ignore")
            # the TorchScript-based exporter: no onnxscript needed, and the graph is the traced one
            torch.onnx.export(model, (x[:1],), str(tmp), dynamo=False, input_names=["image"],
                              output_names=["logits"], opset_version=ONNX_OPSET,
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
            with torch.no_grad():
                _check_close("ONNX", OnnxNetwork(tmp)(x), model(x), config["model"])
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"network {config['model']!r} cannot be exported to ONNX ({str(exc)[:300]})") from None
    return Path(path)


class OnnxNetwork(torch.nn.Module):
    """An ONNX file run by onnxruntime (CPU), callable like the network (tensor in, logits out)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        import onnxruntime as ort  # why: optional extra (privseg[export]); only reading an ONNX file back needs it

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for unreadable models
            raise CheckpointError(f"{path}: not a readable ONNX model ({str(exc)[:300]})") from None
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)


def load_torchscript(path: str | os.PathLike) -> torch.nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable TorchScript model ({str(exc)[:300]})") from None
