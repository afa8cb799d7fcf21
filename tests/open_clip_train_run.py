"""Run open_clip_train's ``main`` once, stock or on fastcl's losses, and record what it trained with.

    python tests/open_clip_train_run.py RESULT.json MODEL_CONFIG.json {stock,fastcl} -- OPEN_CLIP_TRAIN_ARGS...
    torchrun --standalone --nproc-per-node 2 tests/open_clip_train_run.py ...   # RESULT.json.rank0, .rank1

tests/test_open_clip_train.py runs it in the environment tools/open_clip_venv.sh makes, once per side,
each in a fresh process (open_clip_train keeps state in modules: logging handlers, registries).
Nothing of open_clip_train's own is changed; three things are added around it:
- torchvision's compiled ops are PyPI's CUDA build, which does not load against a CPU torch.
  torchvision imports without them, except that ``torchvision/_meta_registrations.py`` registers fake
  kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally, which raises "operator
  torchvision::nms does not exist". Where the ops do not load, their schemas (torchvision's own) are
  defined first, with no kernel: open_clip calls neither.
- the model config (a tiny CLIP) is registered with ``open_clip.add_model_config``, as open_clip's
  docs say to for a config of one's own;
- ``open_clip_train.train.backward`` and ``train_one_epoch`` are wrapped to record each step's total
  loss at full precision (the log prints 5 digits) and the class of the loss ``main`` built;
- under torchrun on CPU: ``main`` wraps the model as ``DistributedDataParallel(model,
  device_ids=[device])``, which torch refuses for a CPU module ("device_ids ... only work with
  single-device/multiple-device GPU modules or CPU modules"); ``device_ids`` of CPU devices are
  dropped, as DDP asks for CPU modules.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import torch


def torchvision_without_its_ops() -> torch.library.Library | None:
    spec = importlib.util.find_spec("torchvision")
    ops = next(pathlib.Path(spec.origin).parent.glob("_C*.so"), None)
    try:
        torch.ops.load_library(ops)  # torchvision's own load of it later is then a no-op
        return None
    except (OSError, TypeError):
        lib = torch.library.Library("torchvision", "DEF")  # kept alive by the caller
        for name in ("nms", "qnms"):
            lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return lib


class CpuDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


def main(argv: list[str]) -> None:
    result_path, config, side, sep, *train_args = argv
    assert sep == "--" and side in ("stock", "fastcl"), argv
    library = torchvision_without_its_ops()  # noqa: F841 (its definitions live as long as it does)

    import open_clip
    import open_clip_train.main
    import open_clip_train.train as train

    open_clip.add_model_config(config)
    record_fastcl = None
    if side == "fastcl":
        import fastcl.integrations.open_clip

        fastcl.integrations.open_clip.install()
        record_fastcl = fastcl.__file__
    record = {"losses": [], "loss_class": None, "side": side, "fastcl": record_fastcl}
    backward, train_one_epoch = train.backward, train.train_one_epoch

    def recording_backward(total_loss, scaler):
        record["losses"].append(total_loss.item())
        record["loss_dtype"] = str(total_loss.dtype)
        return backward(total_loss, scaler)

    def recording_train_one_epoch(model, data, loss, *args, **kwargs):
        record["loss_class"] = f"{type(loss).__module__}.{type(loss).__qualname__}"
        return train_one_epoch(model, data, loss, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDistributedDataParallel  # main looks it up when called
    train.backward = recording_backward
    open_clip_train.main.train_one_epoch = recording_train_one_epoch  # main bound it at import
    status = open_clip_train.main.main(train_args)
    record["status"] = status
    rank = os.environ.get("RANK")  # under torchrun: a record per rank, each its own loss
    pathlib.Path(result_path + (f".rank{rank}" if rank is not None else "")).write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
