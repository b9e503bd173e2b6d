"""`decouple demo`: the whole pipeline on scikit-learn's bundled digits."""

from __future__ import annotations

from typing import Optional

import click


@click.command("demo")
@click.option("--out", "out_dir", default="demo_out", show_default=True, metavar="DIR",
              help="Folder for the data, features, results database, tables and plots.")
@click.option("--finetune-epochs", type=int, default=20, show_default=True,
              help="Stage-one epochs of the CIFAR ResNet-32.")
@click.option("--head-epochs", type=int, default=None,
              help="Stage-two epochs per head [the default budget, which trains each head to convergence].")
@click.option("--imbalance", type=float, default=10.0, show_default=True,
              help="Imbalance factor of the long-tailed training split.")
def demo(out_dir: str, finetune_epochs: int, head_epochs: Optional[int], imbalance: float) -> None:
    """Run stage one, every head x loss x sampler, export, then save and use the best model, on built-in data.

    The data are scikit-learn's 1,797 handwritten digits (8x8, upscaled to
    32 px) with a balanced test split, made long-tailed. The demo ends as a
    user would: `decouple save-model` keeps the val-best method and
    `decouple predict` classifies one held-out image of each digit with it.
    A rerun reuses what is finished in --out.
    """
    from decouple.study.demo import run_demo

    table = run_demo(
        out_dir,
        imbalance=imbalance,
        finetune_epochs=finetune_epochs,
        head_epochs=head_epochs,
        log=lambda message: click.echo(message, err=True),
    )
    click.echo(table)
