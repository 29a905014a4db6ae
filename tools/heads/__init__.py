"""Linear task heads on stored activations: classification probes and segmentation heads.

    from tools.heads import HeadConfig, train_heads, load_head
    run = train_heads(HeadConfig(store="demo/fmnist.zarr", hook="_blocks.10", task="segment"))
    head = load_head(run.out_dpath)          # nn.Module: the hook's activations -> logits

`config` (what to train), `bank` (G heads as one matrix product, hand-written gradient), `optim`
(AdamW with one lr and weight decay per head), `data` (rows from the store), `metrics` (confusion
matrices -> accuracy, per-class accuracy, IoU), `head` (the kept head as a module, its folder),
`report` (confusion PNG, per-class table), `train` (the run).
"""

import importlib

_EXPORTS = {"HeadConfig": ".config", "Head": ".head", "load_head": ".head", "read_head_info": ".head",
            "HeadRun": ".train", "train_heads": ".train"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so `saev-tools --help` (which reads HeadConfig's defaults) does not import torch.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
