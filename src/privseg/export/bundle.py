"""A MONAI bundle in the Model Zoo layout, which MONAI's own runner executes::

    DIR/configs/metadata.json    version, task, labels, channels, spacing, preprocessing, network,
                                 the privacy statement ("privacy") and privseg's export record
    DIR/configs/inference.json   python -m monai.bundle run --config_file configs/inference.json
                                 --bundle_root DIR --dataset_dir IMAGES --output_dir OUT
    DIR/configs/logging.conf     the runner's logging (to stdout)
    DIR/models/model.pt          the weights (a privseg checkpoint without optimizer state:
                                 MONAI's CheckpointLoader takes its "model" entry)
    DIR/models/model.ts          the network, TorchScript (what inference.json runs: no privseg needed)
    DIR/docs/README.md           the model card

The preprocessing is privseg's own (:func:`privseg.data.transforms.preprocess_transform`, the
transforms the model trained and is evaluated with), written out as MONAI config entries; the
sliding window is :func:`privseg.train.inference.predict_probs`'s. The prediction is mapped back
through the inverse transforms (MONAI's ``Invertd``) and written in the input's space, as
``privseg predict`` does.
"""

from __future__ import annotations

import inspect

from privseg.data.transforms import preprocess_transform
from privseg.errors import ConfigError
from privseg.train.inference import predict_probs
from privseg.utils import versions

# MONAI's bundle spec version this layout follows (Model Zoo metadata schema)
SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
IMAGE_SUFFIXES = {3: (".nii.gz", ".nii"), 2: (".png", ".jpg", ".jpeg")}
# configs/logging.conf, which MONAI's runner applies first (stdlib handlers only: MONAI refuses others)
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def _opt(value):
    """A JSON value for a transform argument (tuples and numpy arrays as lists)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple):
        return [_opt(v) for v in value]
    return value


def _monai_step(t) -> dict:
    """One of privseg's preprocessing transforms as a MONAI config entry, for the image key only."""
    name = type(t).__name__
    if name == "Orientationd":
        o = t.ornt_transform
        return {"_target_": name, "keys": "image", "axcodes": o.axcodes, "labels": _opt(o.labels)}
    if name == "Spacingd":
        s = t.spacing_transform
        return {"_target_": name, "keys": "image", "pixdim": _opt(s.pixdim), "mode": str(t.mode[0]),
                "padding_mode": str(t.padding_mode[0]), "align_corners": bool(t.align_corners[0]),
                "dtype": f"$numpy.{t.dtype[0].__name__}"}
    if name == "CropForegroundd":
        c = t.cropper
        if c.select_fn.__name__ != "is_positive" or c.channel_indices is not None or c.k_divisible != 1:
            raise ConfigError("privseg's foreground crop has settings the bundle cannot describe")
        return {"_target_": name, "keys": "image", "source_key": t.source_key, "margin": _opt(c.margin),
                "allow_smaller": bool(c.allow_smaller)}
    if name == "NormalizeIntensityd":
        n = t.normalizer
        return {"_target_": name, "keys": "image", "nonzero": bool(n.nonzero), "channel_wise": bool(n.channel_wise)}
    if name == "ScaleIntensityRanged":
        s = t.scaler
        return {"_target_": name, "keys": "image", "a_min": s.a_min, "a_max": s.a_max, "b_min": s.b_min,
                "b_max": s.b_max, "clip": bool(s.clip)}
    if name == "ScaleIntensityd":
        s = t.scaler
        return {"_target_": name, "keys": "image", "minv": s.minv, "maxv": s.maxv, "channel_wise": bool(s.channel_wise)}
    raise ConfigError(f"privseg's preprocessing has a step ({name}) the bundle cannot describe")


def preprocessing(modality: str, config: dict, ct_window) -> list[dict]:
    """privseg's deterministic preprocessing for ``modality`` as MONAI config entries."""
    dims = int(config["spatial_dims"])
    compose = preprocess_transform(modality, dims, config.get("spacing"), True, ct_window)
    return [_monai_step(t) for t in compose.transforms]


def sliding_window(config: dict) -> dict:
    """The sliding window of :func:`~privseg.train.inference.predict_probs` (its defaults)."""
    defaults = {k: p.default for k, p in inspect.signature(predict_probs).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {"roi_size": [int(p) for p in config["patch_size"]], "sw_batch_size": defaults["sw_batch_size"],
            "overlap": defaults["overlap"], "mode": "gaussian", "padding_mode": "constant"}


def _loader(dims: int, channels: int) -> list[dict]:
    if dims == 3:  # one NIfTI per case; several channels as one 4D file, channels last (MSD)
        return [{"_target_": "LoadImaged", "keys": "image", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"}]
    # PIL as privseg reads it: rows first (no transposition), colour channels last
    return [{"_target_": "LoadImaged", "keys": "image", "image_only": True, "reader": "PILReader",
             "reverse_indexing": False},
            {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": -1 if channels > 1 else "no_channel"}]


def _writer(dims: int, label_values: list[int]) -> list[dict]:
    """Round the inverted label map (privseg inverts it with the image's interpolation and rounds) and
    write it: NIfTI with the input's geometry, or a PNG mask in the dataset's own label values."""
    steps = [{"_target_": "Lambdad", "keys": "pred", "func": "$torch.round"}]
    if dims == 2 and label_values != list(range(len(label_values))):
        steps.append({"_target_": "MapLabelValued", "keys": "pred", "orig_labels": list(range(len(label_values))),
                      "target_labels": label_values})
    save = {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
            "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False, "print_log": False}
    if dims == 2:  # MONAI's PILWriter swaps the two axes back (it assumes PILReader's default reading)
        steps.append({"_target_": "Transposed", "keys": "pred", "indices": [0, 2, 1]})
        save.update(output_ext=".png", writer="PILWriter", scale=None)
    return [*steps, save]


def inference_config(config: dict, modality: str, ct_window, label_values: list[int]) -> dict:
    """configs/inference.json: MONAI's runner segments every image in ``dataset_dir``."""
    dims = int(config["spatial_dims"])
    patterns = " + ".join(f"glob.glob(os.path.join(@dataset_dir, '*{s}'))" for s in IMAGE_SUFFIXES[dims])
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "images",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "datalist": f"$sorted({patterns})",
        "network_def": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location='cpu')",
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            *_loader(dims, int(config["in_channels"])), *preprocessing(modality, config, ct_window)]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", **sliding_window(config)},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            *_writer(dims, label_values)]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
                      "load_dict": {"model": "@network"}, "map_location": "@device"},
                     {"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def metadata(config: dict, *, version: str, classes: list[str], channels: list[str], modality: str,
             ct_window, statement: dict, record: dict) -> dict:
    """configs/metadata.json (Model Zoo fields, the privacy statement, privseg's export record)."""
    v = versions()
    dims = int(config["spatial_dims"])
    patch = [int(p) for p in config["patch_size"]]
    return {
        "schema": SCHEMA, "version": version, "changelog": {version: "exported by privseg"},
        "monai_version": v.get("monai"), "pytorch_version": v.get("torch"), "numpy_version": v.get("numpy"),
        "required_packages_version": {"nibabel": v.get("nibabel")} if dims == 3 else {"pillow": v.get("pillow")},
        "name": f"privseg {config['model']} segmentation",
        "task": f"{dims}D segmentation of {', '.join(classes[1:])}",
        "description": "Exported by privseg from the model its run serves; privacy figures are its ledgers'.",
        "authors": "privseg export", "copyright": "see the model card (docs/README.md)",
        "intended_use": "Research use; see docs/README.md for the data it saw, its privacy and its limits.",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": modality,
                                 "num_channels": len(channels), "channels": channels, "spatial_shape": patch,
                                 "dtype": "float32", "value_range": [], "is_patch_data": True,
                                 "channel_def": dict(enumerate(channels))}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(classes),
                                 "spatial_shape": patch, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": dict(enumerate(classes))}}},
        "labels": dict(enumerate(classes)),
        "preprocessing": {"modality": modality, "spacing": _opt(config.get("spacing")),
                          "ct_window": _opt(ct_window) if modality.upper() == "CT" else None,
                          "transforms": preprocessing(modality, config, ct_window),
                          "sliding_window": sliding_window(config)},
        "network_def": {"builder": "privseg.models.build_model", "name": config["model"], "norm": config["norm"],
                        "in_channels": config["in_channels"], "num_classes": config["num_classes"],
                        "spatial_dims": dims},
        "privacy": statement,
        "privseg": record,
    }
