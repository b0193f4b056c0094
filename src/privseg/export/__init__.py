"""Taking a model to the clinic: the model a run serves, exported as a MONAI bundle (Model Zoo layout,
run by ``python -m monai.bundle run``), TorchScript or ONNX, with a model card whose privacy figures
are the run's ledgers', and a check that the statement still holds (``privseg export verify``).

::

    from privseg.export import export_model, verify_export, predict_export

    export_model("runs/fed", "monai-bundle", "bundle/")      # what `privseg export` does
    verify_export("bundle/")["ok"]                            # hashes + statement recomputed from the run
    predict_export("bundle/", ["scan.nii.gz"], "seg.nii.gz")  # `privseg predict --bundle`
"""

from privseg.export.formats import FORMATS
from privseg.export.source import Served, served_model
from privseg.export.verify import predict_export, read_manifest, verify_export
from privseg.export.write import export_model

__all__ = ["FORMATS", "Served", "export_model", "predict_export", "read_manifest", "served_model", "verify_export"]
