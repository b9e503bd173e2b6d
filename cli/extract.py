"""`decouple extract`: fine-tune a timm backbone on images and cache its embeddings (stage one)."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Dict, Optional, Tuple

import click


def _parse_params(option: str, pairs: Tuple[str, ...]) -> Dict[str, Any]:
    """``key=value`` pairs; values read as YAML scalars (0.5, true, [1, 2])."""
    import yaml

    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE; got {pair!r}", param_hint=option)
        params[key.strip()] = yaml.safe_load(value)
    return params


def _parse_steps(value: Optional[str]) -> Tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated epochs like 160,180; got {value!r}", param_hint="--lr-steps")


@click.command("extract")
@click.option("--data", required=True, metavar="PATH",
              help="Image folder (ROOT/<class>/*, or ROOT/train|val|test/<class>/*), a CSV manifest "
                   "(path,label[,split[,group]]) or a CIFAR-10/100 python folder.")
@click.option("--source", default="auto", show_default=True,
              help="How to read --data: auto, image_folder, split_folders, manifest, cifar.")
@click.option("--backbone", default="resnet32_cifar", show_default=True, metavar="NAME",
              help="Any timm model name (e.g. mobilenetv2_100, resnetv2_50, convnext_base, vit_base_patch16_224).")
@click.option("--pretrained", is_flag=True, help="Start from timm's pretrained weights (local cache when offline).")
@click.option("--weights", default=None, metavar="FILE",
              help="Start from a local state dict: timm keys, or a same-architecture checkpoint matched by position.")
@click.option("--imbalance", type=float, default=None, metavar="IF",
              help="Subsample train on the exponential profile n_i = n_max*(1/IF)^(i/(C-1)) (Cao et al. 2019).")
@click.option("--train-profile", type=click.Choice(["long_tailed", "balanced"]), default="long_tailed",
              show_default=True,
              help="balanced: the balanced sibling of the --imbalance profile (same --seed, --n-max): its val, "
                   "test and test_lt, n_max training images per class (a superset of its train), and its "
                   "training counts stored as /train/reference_counts, from which the shot groups come.")
@click.option("--n-max", type=int, default=None,
              help="Head-class count of the profile (default: the largest that leaves --val-per-class for val).")
@click.option("--val-per-class", type=int, default=20, show_default=True,
              help="Balanced val images per class from the images --imbalance leaves over.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Stratified val fraction of each class when there is no --imbalance.")
@click.option("--min-val-per-class", type=int, default=1, show_default=True,
              help="Least val images per class of the stratified val.")
@click.option("--test-fraction", type=float, default=0.2, show_default=True,
              help="Stratified test fraction carved when the data has no test split.")
@click.option("--group-by", default=None, metavar="REGEX",
              help="Carve val (and test) by whole groups, disjoint from train: the first capture group of REGEX, "
                   "searched in each file name, names the image's group (e.g. '^(\\d+)_' for tracks "
                   "00012_00007.jpg); a name that does not match is an error. A manifest's group column does "
                   "the same without this option.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds splits, initialisation, sampling and augmentation.")
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image instead of skipping and listing it.")
@click.option("--check/--no-check", "check_images", default=True, show_default=True,
              help="Decode every image once before training.")
@click.option("--img-size", default="auto", show_default=True,
              help="Input side in pixels, 'model' (the model's), or 'auto' (the model's when pretrained, "
                   "else the data's own size if smaller).")
@click.option("--epochs", type=int, default=10, show_default=True, help="Fine-tune epochs; 0 extracts frozen features.")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Images per step and process.")
@click.option("--eval-batch-size", type=int, default=None, help="Images per extraction step (default 2x --batch-size).")
@click.option("--optimizer", default="sgd", show_default=True, help="sgd or adamw.")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default 0.05 for sgd, 1e-3 for adamw).")
@click.option("--weight-decay", type=float, default=None, help="Default 5e-4 for sgd, 0.05 for adamw.")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum / AdamW beta1.")
@click.option("--schedule", default="cosine", show_default=True, help="cosine or step decay after warmup.")
@click.option("--warmup-epochs", type=float, default=1.0, show_default=True, help="Linear warmup (capped at half the run).")
@click.option("--lr-steps", default=None, metavar="E1,E2",
              help="Epochs where the step schedule decays (default 80% and 90% of --epochs).")
@click.option("--lr-decay", type=float, default=0.1, show_default=True, help="Factor of each step decay.")
@click.option("--accumulate", type=int, default=1, show_default=True, help="Batches per optimizer step.")
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast on CUDA.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True, help="channels_last on CUDA.")
@click.option("--loss", default="ce", show_default=True, help="A stage-two loss (decouple list).")
@click.option("--loss-param", multiple=True, metavar="KEY=VALUE", help="A loss parameter, repeatable.")
@click.option("--sampler", default="instance", show_default=True, help="A stage-two sampler (decouple list).")
@click.option("--sampler-param", multiple=True, metavar="KEY=VALUE", help="A sampler parameter, repeatable.")
@click.option("--workers", type=int, default=None, help="Loader processes (default 0 on CPU, up to 8 per GPU).")
@click.option("--cache-images", type=click.Choice(["off", "auto", "memory", "disk", "device"]), default="off",
              show_default=True,
              help="Decode and resize every training image once, to uint8 in RAM (memory), in a file in the "
                   "features folder that reruns and runs on the same images reuse (disk) or in the training "
                   "device's memory (device), and augment whole batches there (pad-and-crop or random-resized "
                   "crop, flip, colour jitter, normalise) instead of decoding every image every epoch (off). "
                   "auto: for inputs of 64 px or less, memory when the images fit in a quarter of RAM, else disk; "
                   "off above. Another draw of the same augmentation, so not the same numbers as off; off by "
                   "default until its accuracy is shown equal over several seeds (docs/benchmarks.md).")
@click.option("--views", type=int, default=0, show_default=True,
              help="Also store K augmented embeddings per training image (/train/views).")
@click.option("--dtype", default="float16", show_default=True, help="float16 or float32 features.")
@click.option("--out", default=None, metavar="FILE", help="Feature file (default FEATURES_DIR/RUN.h5).")
@click.option("--name", "run", default=None, metavar="RUN",
              help="Run name: writes FEATURES_DIR/RUN.h5 (default <data>_<backbone>[_lt<IF>]).")
@click.option("--features-dir", default="features", show_default=True, help="Where feature files go.")
@click.option("--checkpoint", default=None, metavar="FILE", help="Per-epoch checkpoint (default beside the features).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint when there is one.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def extract(**options: Any) -> None:
    """Fine-tune a timm backbone on an image folder and cache embeddings of every split.

    \b
    Writes FEATURES_DIR/RUN.h5 (decouple-features v1; train, val, test and,
    with --imbalance, test_lt) and RUN.manifest.csv beside it. Launch with
    torchrun --nproc_per_node=N (and --nnodes) for DistributedDataParallel.
    """
    from decouple.stage_one.extract import ExtractConfig, run_extract
    from decouple.stage_one.finetune import FinetuneConfig
    from decouple.stage_one.splits import SplitOptions

    progress = options.pop("progress")
    as_json = options.pop("as_json")
    seed = options["seed"]  # seeds the splits and the fine-tune alike
    split = SplitOptions(**{field.name: options.pop(field.name) for field in dataclasses.fields(SplitOptions)})
    finetune_keys = (
        "epochs", "batch_size", "lr", "optimizer", "weight_decay", "momentum", "schedule",
        "warmup_epochs", "lr_decay", "accumulate", "amp", "channels_last", "loss", "sampler",
        "workers", "cache_images",
    )
    finetune = FinetuneConfig(
        **{key: options.pop(key) for key in finetune_keys},
        seed=seed,
        lr_steps=_parse_steps(options.pop("lr_steps")),
        loss_params=_parse_params("--loss-param", options.pop("loss_param")),
        sampler_params=_parse_params("--sampler-param", options.pop("sampler_param")),
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    log = lambda message: click.echo(message, err=True)  # stdout holds only the result
    result = run_extract(ExtractConfig(split=split, finetune=finetune, **options), log=log)
    if result.world_size > 1:
        import os

        if os.environ.get("RANK", "0") != "0":
            return
    if as_json:
        click.echo(json.dumps(result.as_dict(), sort_keys=True))
    else:
        sizes = ", ".join(f"{name} {n}" for name, n in result.splits.items())
        click.echo(f"wrote {result.path} ({sizes}; D={result.dim}) and {result.manifest_path}")
