"""How stage two trains: :class:`TrainConfig` (step budget, optimiser,
learning rate, weight decay, device, precision, shot groups) and
the probe that picks bfloat16 on GPUs that multiply it natively."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from decouple.errors import ConfigError
from decouple.metrics import DEFAULT_SHOT_RULE, SHOT_RULES

OPTIMIZERS = ("adam", "sgd", "adamw")
#: Peak learning rate of each optimizer when TrainConfig.lr is None. Adam's
#: (a step per coordinate of the standardised features) is the one whose
#: heads came closest to a converged L-BFGS fit within the default budget on
#: the shapes of tests/test_convergence.py (0.05 and 0.1 were measured too);
#: SGD's is the classic linear-probe one.
DEFAULT_LR = {"adam": 0.07, "adamw": 0.07, "sgd": 0.1}
#: Precisions of the fused trainer's matrix products (TrainConfig.precision).
PRECISIONS = ("float32", "bfloat16", "auto")
#: The priors a view names (``test_lt@train``): :mod:`decouple.stage_two.priors`.
NAMED_PRIORS = ("uniform", "train")


@dataclass(frozen=True)
class TrainConfig:
    """How gradient-trained heads are trained and how results are grouped.

    **Budget.** With ``epochs`` None (the default) a head trains for
    ``max(min_epochs, ceil(min_steps / steps_per_epoch))`` epochs, where an
    epoch is ceil(N / batch_size) steps over the N training rows: at least
    600 optimizer steps however small the file (2,000 rows are 4 steps an
    epoch, so 150 epochs), and at least 10 passes over the tail classes'
    few images however large it is. Measured on three feature shapes
    (``tests/test_convergence.py``) this reaches the optimum of the
    objective to within the accuracy that val can see; a fixed epoch count
    does not (30 epochs of 4 steps is 120 steps). ``epochs`` set to a
    number trains exactly that many epochs. :meth:`for_rows` resolves the
    budget for a file; results record the resolved ``epochs``.

    **Objective and optimiser.** Features are standardised with train
    statistics (:class:`~decouple.stage_two.trainer.PreparedData`); the
    linear family minimises the loss plus ``weight_decay`` / 2 * ||W||^2
    (the bias is not penalised), the cosine family the loss alone (its
    weights are normalised). ``optimizer``
    "adam" (the default; its per-coordinate steps reach the rare classes'
    weights, which plain SGD moves by a step proportional to their
    frequency) or "sgd" (momentum) add the penalty to the gradient, so both
    converge to the same optimum; "adamw" decays the weights decoupled from
    the gradient (Loshchilov & Hutter, ICLR 2019). ``lr`` None means
    DEFAULT_LR of the optimizer; the schedule is cosine over the whole run.

    ``device`` None means "cuda" when a GPU is visible, else "cpu".
    ``groups`` is the rule of the metrics' shot groups
    (:func:`decouple.metrics.shot_groups`): "thresholds" (the default:
    many > ``many_threshold``, few < ``few_threshold`` training images,
    100 and 20 by default) or "thirds" (the classes ranked by training
    count, cut into three equal groups; the thresholds are then unused).
    ``views``: extra scored views ``<split>@<prior>``, e.g. ``test_lt@train``:
    the split scored again with every head's scores moved from the prior
    it assumes to the named one, "uniform" or "train"
    (:mod:`decouple.stage_two.priors`); stored as a split of that name.

    **Precision** of the fused trainer's two large matrix products per step
    (the logits and the weight gradient,
    :func:`~decouple.stage_two.trainer.train_heads`): "float32"; "bfloat16" (mixed precision: weights, optimiser state, losses
    and reported scores stay float32); or "auto" (the default): bfloat16 on
    a CUDA GPU with native bf16, float32 everywhere else, so that on any CPU
    the same seed gives the same numbers whatever its instruction set. On a
    CPU bfloat16 is an explicit opt-in. :meth:`validated` resolves "auto",
    so results and sweep keys record the precision actually used.
    """

    epochs: Optional[int] = None
    min_steps: int = 600
    min_epochs: int = 10
    lr: Optional[float] = None
    batch_size: int = 512
    optimizer: str = "adam"
    weight_decay: float = 5e-4
    momentum: float = 0.9
    device: Optional[str] = None
    many_threshold: int = 100
    few_threshold: int = 20
    precision: str = "auto"
    groups: str = DEFAULT_SHOT_RULE
    views: Tuple[str, ...] = ()

    def validated(self) -> "TrainConfig":
        """Self after checking every field, with ``precision`` "auto" and ``lr``
        None resolved; a bad value is a ConfigError naming it."""
        for name in ("batch_size", "min_steps", "min_epochs") + (("epochs",) if self.epochs is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"train setting {name} must be an integer >= 1; got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"train setting optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}"
            )
        lr = DEFAULT_LR[self.optimizer] if self.lr is None else self.lr
        for name, value in (("lr", lr), ("weight_decay", self.weight_decay), ("momentum", self.momentum)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"train setting {name} must be a finite number; got {value!r}")
            if name == "lr" and value <= 0:
                raise ConfigError(f"train setting lr must be > 0; got {value!r}")
            if name != "lr" and value < 0:
                raise ConfigError(f"train setting {name} must be >= 0; got {value!r}")
        if self.few_threshold > self.many_threshold:
            raise ConfigError(
                f"train setting few_threshold ({self.few_threshold}) must not exceed "
                f"many_threshold ({self.many_threshold})"
            )
        if self.groups not in SHOT_RULES:
            raise ConfigError(
                f"train setting groups must be one of {', '.join(SHOT_RULES)}; got {self.groups!r}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"train setting precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}"
            )
        views = (self.views,) if isinstance(self.views, str) else self.views
        if not isinstance(views, (list, tuple)) or not all(isinstance(view, str) for view in views):
            raise ConfigError(f"train setting views must be a list of <split>@<prior>, e.g. [test_lt@train]; "
                              f"got {self.views!r}")
        for view in views:
            split, at, prior = view.partition("@")
            if not at or not split or prior not in NAMED_PRIORS:
                raise ConfigError(f"train setting views: {view!r} must be <split>@<prior> with prior "
                                  f"{' or '.join(NAMED_PRIORS)}, e.g. test_lt@train")
        return replace(self, lr=float(lr), precision=self.resolved_precision(), views=tuple(dict.fromkeys(views)))

    def epochs_for(self, num_rows: int) -> int:
        """Epochs of a run over ``num_rows`` training rows: ``epochs`` if set,
        else the step and epoch budget of the class docstring."""
        if self.epochs is not None:
            return int(self.epochs)
        steps_per_epoch = -(-int(num_rows) // int(self.batch_size))
        return max(int(self.min_epochs), -(-int(self.min_steps) // steps_per_epoch))

    def for_rows(self, num_rows: int) -> "TrainConfig":
        """Self with ``epochs`` resolved for ``num_rows`` training rows."""
        return replace(self, epochs=self.epochs_for(num_rows))

    def resolved_device(self) -> str:
        """The torch device string training runs on."""
        if self.device is not None:
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_precision(self) -> str:
        """"float32" or "bfloat16": ``precision``, with "auto" resolved for the
        training device (bfloat16 on a CUDA GPU with native bf16, else float32)."""
        if self.precision != "auto":
            return self.precision
        return "bfloat16" if native_bfloat16(self.resolved_device()) else "float32"

    def to_dict(self) -> Dict[str, Any]:
        """The settings as plain JSON values, device, precision and lr resolved."""
        values = asdict(self.validated())
        values["device"] = self.resolved_device()
        return values


def native_bfloat16(device: str) -> bool:
    """Whether "auto" precision picks bfloat16 on ``device``: a CUDA GPU that
    multiplies bf16 natively (Ampere or newer). CPUs always get float32 under
    "auto", with or without native bf16 (AVX512-BF16, AMX), so that their
    numbers never depend on the instruction set."""
    if torch.device(device).type != "cuda":
        return False
    # Emulated bf16 (pre-Ampere) is slower than float32: native only.
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
