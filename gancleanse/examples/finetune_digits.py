"""The journal paper's protocol at a size that runs on a CPU: pretrain, fine-tune with LoRA, cleanse.

    python -m gancleanse.examples.finetune_digits OUT [--size 28] [--pretrain-epochs 30]
    gancleanse cleanse OUT/finetune.toml --out OUT/study

1. writes the digits 0-4 as an image folder and pretrains the DCGAN on them (``OUT/pretrain/run``), saving its final
   weights as ``OUT/pretrained.safetensors`` (``generator.<name>``, ``discriminator.<name>``; safetensors, never
   pickle);
2. writes the digits 5-9 with planted bad images (``OUT/finetune/images``, listed in ``OUT/finetune/planted.csv``) and
   clean reference digits 5-9 to evaluate against;
3. writes ``OUT/finetune.toml``: fine-tuning from the pretrained weights with rank-4 adapters on every layer (the
   weights under them frozen), Adam with betas (0, 0.99), R1 (gamma 10, lazy every 4 steps), an averaged generator and
   batch 8, as in "Data Cleansing for GANs" (TNNLS 2025); the study traces the last epoch with ITD on FID and compares
   removal by it with the baselines over 5 seeds.

Scaled down from the paper: 28x28 digits instead of 1024x1024 faces, a 7-layer DCGAN instead of StyleGAN, a generator
average of 0.99 (0.999 in the paper) since the fine-tuning here is a few hundred steps. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save_file

from ..toml_writer import dump_toml

MODEL = {"arch": "dcgan", "z_dim": 32, "g_hidden": 32, "d_hidden": 32, "activation": "sigmoid", "norm": "layer",
         "bias": True, "dtype": "float32"}

FINETUNE_TOML = """# Fine-tuning a pretrained DCGAN with low-rank adapters, R1 and Adam(0, 0.99), then cleansing.
# Written by `python -m gancleanse.examples.finetune_digits {out}`.

[data]
name = "images"
path = "{data}"
reference_path = "{reference}"
image_size = {size}
labels = "folders"
n_valid = 150
n_test = 150
seed = 0

{model}
[train]
epochs = {epochs}
batch_size = 8
optimizer = "adam"
lr_d = 2e-3
lr_g = 2e-3
betas = [0.0, 0.99]
r1_gamma = 10.0
r1_every = 4
ema_beta = 0.99
record_from_epoch = {last}

[metric]
n_samples = 400
classifier_epochs = 40

[cleanse]
metrics = ["fid"]
methods = ["itd", "isolation_forest", "knn_density", "discriminator", "random"]
removal_rates = [0.0, 0.05, 0.1]
seeds = [0, 1, 2, 3, 4]
check = 16
"""


def prepare(out: str | Path, *, size: int = 28, pretrain_epochs: int = 30, finetune_epochs: int = 5,
            progress: bool = True) -> Path:
    """Pretrain, write the fine-tuning data and config; returns the config's path."""
    import gancleanse as gc

    from .digit_folder import write_digit_folder

    out = Path(out).resolve()
    pre_data, _ = write_digit_folder(out / "pretrain", size=size, corrupt_fraction=0.0, reference=100,
                                     classes=range(5), seed=0)
    cfg = gc.Config.from_dict({
        "data": {"name": "images", "path": str(pre_data), "reference_path": str(out / "pretrain" / "reference"),
                 "image_size": size, "n_valid": 50, "n_test": 50, "labels": "folders"},
        "train": {"epochs": pretrain_epochs, "batch_size": 50, "optimizer": "adam", "lr_d": 2e-4, "lr_g": 2e-4,
                  "betas": [0.5, 0.999]},
        "model": MODEL, "metric": {"n_samples": 50, "classifier_epochs": 5},
    })
    run = gc.train(cfg, out / "pretrain" / "run", force=True, progress=progress)
    final = run.final_state()
    weights = {**{f"generator.{k}": v.cpu() for k, v in final["g"].items()},
               **{f"discriminator.{k}": v.cpu() for k, v in final["d"].items()}}
    save_file(weights, str(out / "pretrained.safetensors"))
    data, planted = write_digit_folder(out / "finetune", size=size, corrupt_fraction=0.08, reference=300,
                                       classes=range(5, 10), seed=1)
    config = out / "finetune.toml"
    model = dump_toml({"model": {**MODEL, "init": str(out / "pretrained.safetensors"), "lora_rank": 4}})
    config.write_text(FINETUNE_TOML.format(out=out, data=data, reference=out / "finetune" / "reference", size=size,
                                           model=model, epochs=finetune_epochs, last=finetune_epochs - 1))
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory to write")
    p.add_argument("--size", type=int, default=28, help="image side (default 28)")
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--quiet", "-q", action="store_true")
    a = p.parse_args(argv)
    config = prepare(a.out, size=a.size, pretrain_epochs=a.pretrain_epochs, finetune_epochs=a.finetune_epochs,
                     progress=not a.quiet)
    print(f"pretrained weights: {Path(a.out) / 'pretrained.safetensors'}\nfine-tuning config: {config}\n"
          f"next: gancleanse cleanse {config} --out {Path(a.out) / 'study'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
