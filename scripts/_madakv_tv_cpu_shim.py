"""Lets PyPI's CUDA torchvision import next to torch+cpu (installed as a .pth by install_cpu.sh).

Its C extension cannot load, and its meta registrations then fail on the missing
`torchvision::nms` schema; defining the schemas first makes the pure-Python parts usable.
"""
import importlib.abc
import sys


class _TorchvisionCpuShim(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        if torch.version.cuda is None:
            for op in ("nms", "qnms"):
                try:
                    torch.library.define(
                        f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
                    )
                except RuntimeError:
                    pass
        return None


sys.meta_path.insert(0, _TorchvisionCpuShim())
