"""Stage two: retrain classifier heads on cached features, many at once.

Kang et al., "Decoupling Representation and Classifier for Long-Tailed
Recognition" (ICLR 2020): the representation is fixed and only the
classifier is relearned, once per long-tailed loss, re-sampler and head.

A *cell* is one (head, loss, sampler, seed). :func:`fit_cells` fits a list of
cells on one :class:`~decouple.features.FeatureSet` and scores every split
other than train. Gradient-trained cells that share a sampler, a seed and a
weight family (``linear`` for the linear, tau_norm and lws heads; ``cosine``
for the cosine head) train *together* in one pass over the features, the
way DINOv2's linear probe trains many heads at once: the K heads' weights sit
stacked in one (K * C, D) matrix, so one product X (B, D) @ W.T gives
every head's logits, each head's loss is applied to its own slice and the
summed losses are backpropagated. Heads share no parameter, so the gradient
of head k is that of its own loss: this is K separate trainings on the same
batches with the same initialisation, done in one pass. (The optimisers'
updates are element-wise, so Adam, SGD and AdamW keep that equivalence.)

Training details, chosen so that every head reaches its optimum out of the
box, on any backbone's features and any file size (issue 8; measured in
``tests/test_convergence.py`` against a converged L-BFGS fit):

* Features are standardised with train statistics: every feature centred
  and scaled to the same spread, a row's root-mean-square norm FEATURE_NORM
  (:class:`PreparedData`); the learned weights are mapped back to the
  original feature space afterwards. The cosine head normalises these
  standardised rows.
* Adam (or SGD with momentum, or AdamW) under a cosine learning-rate
  schedule, batches drawn from the sampler's ``epoch_indices()``, for a
  budget of optimizer steps rather than a fixed epoch count
  (:class:`TrainConfig`): a small file gets as many steps as a large one.
* After every epoch each head is scored on val (one matrix product for all
  heads) by mean per-class accuracy, and :class:`EpochChooser` keeps the
  latest epoch within one standard error of its best. The choice is never
  made on test. Without a val split the last epoch is kept and the result
  records ``"selected_on": "last_epoch"``.
* The same seed gives the same numbers on the CPU: initial weights come from
  ``seed``, batches from the sampler's (seed, epoch) draws, and a loss that
  draws random numbers (equalization) draws them from a generator of its
  own seeded with ``seed`` (``LongTailLoss.reseed``), so a fused pass equals
  separate runs bit for bit and a resumed sweep equals an uninterrupted one.
* On the CPU, small problems train on one thread (SMALL_STEP_MACS).
* ``TrainConfig.precision`` "float32" (the default on any CPU) or
  "bfloat16" (the default on a CUDA GPU with native bf16, an opt-in on a
  CPU) for the two large products of each step, with float32 master
  weights, optimiser state and losses (:func:`train_heads`); the precision
  used is recorded in every result's ``params["train"]``.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from decouple.errors import ConfigError
from decouple.metrics import evaluate
from decouple.provenance import jsonable

OPTIMIZERS = ("adam", "sgd", "adamw")
#: Peak learning rate of each optimizer when TrainConfig.lr is None. Adam's
#: (a step per coordinate of the standardised features) is the one whose
#: heads came closest to a converged L-BFGS fit within the default budget on
#: the shapes of tests/test_convergence.py (0.05 and 0.1 were measured too);
#: SGD's is the classic linear-probe one.
DEFAULT_LR = {"adam": 0.07, "adamw": 0.07, "sgd": 0.1}
#: Precisions of the fused trainer's matrix products (TrainConfig.precision).
PRECISIONS = ("float32", "bfloat16", "auto")


# ---------------------------------------------------------------------------
# Configuration and results.
# ---------------------------------------------------------------------------


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
    statistics (see :class:`PreparedData`); the linear family minimises the
    loss plus ``weight_decay`` / 2 * ||W||^2 (the bias is not penalised), the
    cosine family the loss alone (its weights are normalised). ``optimizer``
    "adam" (the default; its per-coordinate steps reach the rare classes'
    weights, which plain SGD moves by a step proportional to their
    frequency) or "sgd" (momentum) add the penalty to the gradient, so both
    converge to the same optimum; "adamw" decays the weights decoupled from
    the gradient (Loshchilov & Hutter, ICLR 2019). ``lr`` None means
    DEFAULT_LR of the optimizer; the schedule is cosine over the whole run.

    ``device`` None means "cuda" when a GPU is visible, else "cpu".
    ``many_threshold`` / ``few_threshold`` define the shot groups of the
    metrics (many > 100, few < 20 training images by default).

    **Precision** of the fused trainer's two large matrix products per step
    (the logits and the weight gradient, see :func:`train_heads`):
    "float32"; "bfloat16" (mixed precision: weights, optimiser state, losses
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
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"train setting precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}"
            )
        return replace(self, lr=float(lr), precision=self.resolved_precision())

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
        import torch

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
    import torch

    if torch.device(device).type != "cuda":
        return False
    # Emulated bf16 (pre-Ampere) is slower than float32: native only.
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


@dataclass(frozen=True)
class Cell:
    """One (head, loss, sampler, seed) to fit.

    ``params`` holds per-method settings keyed by method name, as in a sweep
    config's ``params:`` (e.g. ``{"focal": {"gamma": 2.0}, "knn": {"k": 10}}``);
    only the entries of this cell's head, loss and sampler are used. When a
    name is both a loss and a sampler (``class_balanced``) and the cell uses
    both, each receives the keys it accepts.
    """

    head: str
    loss: Optional[str] = None
    sampler: Optional[str] = None
    seed: int = 0
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass
class CellResult:
    """The outcome of one cell: DESIGN.md's ``decouple head`` object."""

    features: str
    head: str
    loss: Optional[str]
    sampler: Optional[str]
    seed: int
    params: Dict[str, Any]
    fit_seconds: float
    metrics: Dict[str, Dict[str, Any]]

    def to_json(self) -> Dict[str, Any]:
        """The JSON object of DESIGN.md (plain dicts, lists, numbers, strings)."""
        return {
            "features": self.features,
            "head": self.head,
            "loss": self.loss,
            "sampler": self.sampler,
            "seed": self.seed,
            "params": jsonable(self.params),
            "fit_seconds": round(float(self.fit_seconds), 4),
            "metrics": jsonable(self.metrics),
        }


# ---------------------------------------------------------------------------
# Cell validation and per-method parameters.
# ---------------------------------------------------------------------------


def validate_cell(cell: Cell) -> Cell:
    """Check a cell's names and combination; return it with defaults filled in.

    Unknown names raise UnknownNameError listing the known ones. A head that
    needs no training (ncm, knn) takes no loss or sampler; a trainable head
    without one gets ``"ce"`` and ``"instance"``.
    """
    from decouple.stage_two.heads import HEADS
    from decouple.stage_two.losses import LOSSES
    from decouple.stage_two.samplers import SAMPLERS

    head_class = HEADS.get(cell.head)
    seed = cell.seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0; got {seed!r}")
    if not isinstance(cell.params, Mapping):
        raise ConfigError(f"params must map method names to settings; got {type(cell.params).__name__}")
    for name, settings in cell.params.items():
        if not isinstance(settings, Mapping):
            raise ConfigError(
                f"params.{name} must be a mapping of settings; got {type(settings).__name__}"
            )
    if head_class.trainable:
        loss = LOSSES.check(cell.loss if cell.loss is not None else "ce")
        sampler = SAMPLERS.check(cell.sampler if cell.sampler is not None else "instance")
    else:
        for kind, value in (("loss", cell.loss), ("sampler", cell.sampler)):
            if value is not None:
                raise ConfigError(
                    f"head {cell.head!r} is training-free and takes no {kind}; got {kind} {value!r} "
                    f"(leave it out, or use a trainable head: "
                    f"{', '.join(name for name in HEADS if HEADS.get(name).trainable)})"
                )
        loss = sampler = None
    return replace(cell, loss=loss, sampler=sampler, seed=int(seed))


def _accepts(registry, name: str) -> set:
    return set(registry.parameters(name))


def method_params(cell: Cell) -> Dict[str, Dict[str, Any]]:
    """The settings for a validated cell's head, loss and sampler, as given (no defaults).

    Returns ``{"head": {...}, "loss": {...}, "sampler": {...}}``.
    """
    from decouple.stage_two.losses import LOSSES
    from decouple.stage_two.samplers import SAMPLERS

    head_params = dict(cell.params.get(cell.head, {}))
    loss_params = dict(cell.params.get(cell.loss, {})) if cell.loss else {}
    sampler_params = dict(cell.params.get(cell.sampler, {})) if cell.sampler else {}
    if cell.loss is not None and cell.loss == cell.sampler:
        # One entry serves both: each takes the keys it accepts.
        given = dict(cell.params.get(cell.loss, {}))
        loss_keys = _accepts(LOSSES, cell.loss) - {"class_counts"}
        sampler_keys = _accepts(SAMPLERS, cell.sampler) - {"labels", "total_epochs", "seed", "num_samples"}
        unknown = sorted(set(given) - loss_keys - sampler_keys)
        if unknown:
            raise ConfigError(
                f"params.{cell.loss}: neither the loss nor the sampler {cell.loss!r} takes "
                f"{unknown[0]!r}; the loss takes: {', '.join(sorted(loss_keys)) or 'none'}; "
                f"the sampler takes: {', '.join(sorted(sampler_keys)) or 'none'}"
            )
        loss_params = {key: value for key, value in given.items() if key in loss_keys}
        sampler_params = {key: value for key, value in given.items() if key in sampler_keys}
    return {"head": head_params, "loss": loss_params, "sampler": sampler_params}


def _freeze(mapping: Mapping[str, Any]) -> Tuple:
    return tuple(sorted((key, repr(value)) for key, value in mapping.items()))


# ---------------------------------------------------------------------------
# Prepared tensors and the fused trainer.
# ---------------------------------------------------------------------------


#: Root-mean-square norm of a standardised training row. With it one weight
#: decay (5e-4) means the same on the features of any backbone, whatever
#: their dimension and scale.
FEATURE_NORM = 10.0
#: A feature whose train standard deviation is below this fraction of the
#: largest one is constant for training purposes: it is zeroed, not amplified.
CONSTANT_FEATURE = 1e-6


@dataclass
class PreparedData:
    """Training and val tensors on the training device, standardised once.

    ``x`` (N, D) = (features - mean) * scale: ``mean`` (D,) is the training
    mean and ``scale`` (D,) = FEATURE_NORM / (std_d * sqrt(D')), std_d the
    training standard deviation of feature d and D' the number of
    non-constant features, so every feature has the same spread and a row's
    root-mean-square norm is FEATURE_NORM. Constant features (std below
    CONSTANT_FEATURE of the largest) get scale 0. Per-feature
    standardisation is what conditions the problem: embeddings of real
    backbones spread their channels over orders of magnitude, which a single
    step size cannot serve. ``x_val`` likewise (or None). Labels are int64
    tensors. The cosine family uses these rows scaled to unit norm
    (:meth:`normalized`).
    """

    x: Any
    y: Any
    x_val: Any
    y_val: Any
    mean: Any
    scale: Any
    num_classes: int
    class_counts: np.ndarray
    device: str
    _normalized: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_arrays(
        cls,
        features: np.ndarray,
        labels: np.ndarray,
        *,
        val_features: Optional[np.ndarray] = None,
        val_labels: Optional[np.ndarray] = None,
        num_classes: Optional[int] = None,
        device: str = "cpu",
    ) -> "PreparedData":
        import torch

        labels = np.asarray(labels, dtype=np.int64)
        num_classes = int(num_classes if num_classes is not None else labels.max() + 1)
        x = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=device)
        mean = x.mean(dim=0)
        x = x - mean
        std = x.pow(2).mean(dim=0).sqrt()
        active = std > CONSTANT_FEATURE * float(std.max())
        scale = torch.zeros_like(std)
        scale[active] = FEATURE_NORM / (std[active] * math.sqrt(max(int(active.sum()), 1)))
        x.mul_(scale)
        x_val = y_val = None
        if val_features is not None and val_labels is not None:
            x_val = torch.as_tensor(np.asarray(val_features), dtype=torch.float32, device=device)
            x_val = (x_val - mean).mul_(scale)
            y_val = torch.as_tensor(np.asarray(val_labels, dtype=np.int64), device=device)
        return cls(
            x=x,
            y=torch.as_tensor(labels, device=device),
            x_val=x_val,
            y_val=y_val,
            mean=mean,
            scale=scale,
            num_classes=num_classes,
            class_counts=np.bincount(labels, minlength=num_classes),
            device=device,
        )

    def standardize(self, features: np.ndarray):
        """(features - mean) * scale as a tensor on the device, (N, D)."""
        import torch

        x = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=self.device)
        return (x - self.mean).mul_(self.scale)

    def normalized(self, which: str):
        """The standardised rows of train ("train") or val ("val") scaled to
        unit L2 norm, (N, D): the cosine family's inputs; computed once."""
        import torch.nn.functional as F

        if which not in self._normalized:
            source = self.x if which == "train" else self.x_val
            self._normalized[which] = None if source is None else F.normalize(source, dim=1)
        return self._normalized[which]


@dataclass
class TrainedWeights:
    """One trained head of a fused pass, in the standardised feature space.

    ``weight`` (C, D), ``bias`` (C,) or None (cosine family),
    ``logit_scale`` (cosine family: logits = logit_scale * cos),
    ``epoch`` the kept epoch (1-based), ``val_score`` its val mean per-class
    accuracy (None without val), ``selected_on`` "val" or "last_epoch".
    """

    family: str
    weight: Any
    bias: Any
    logit_scale: float
    epoch: int
    val_score: Optional[float]
    selected_on: str
    history: List[float] = field(default_factory=list)


FAMILIES = ("linear", "cosine")


def mean_class_score(predictions, labels, num_classes: int, *, with_error: bool = False):
    """Mean per-class accuracy of each column of ``predictions`` (N, K) -> (K,).

    ``with_error``: also its standard error (K,), sqrt(sum_c a_c (1 - a_c) /
    n_c) / C over the C classes present, with a_c the class's accuracy on its
    n_c images (independent binomial classes)."""
    import torch

    correct = (predictions == labels[:, None]).to(torch.float32)
    totals = torch.zeros(num_classes, predictions.shape[1], device=predictions.device)
    totals.index_add_(0, labels, correct)
    support = torch.bincount(labels, minlength=num_classes).to(torch.float32)
    present = support > 0
    per_class = totals[present] / support[present, None]
    score = per_class.mean(dim=0)
    if not with_error:
        return score
    variance = (per_class * (1.0 - per_class) / support[present, None]).sum(dim=0)
    return score, variance.sqrt() / int(present.sum())


#: At most this many epochs of a run are scored on val (evenly spaced, the
#: last always): a small file's budget is hundreds of one-step epochs, which
#: val needs not tell apart one by one.
VAL_CHECKS = 50


def is_checkpoint(epoch: int, epochs: int) -> bool:
    """Whether the end of ``epoch`` (0-based) of ``epochs`` is scored on val:
    every ceil(epochs / VAL_CHECKS)-th epoch, counted back from the last."""
    stride = -(-epochs // VAL_CHECKS)
    return (epochs - 1 - epoch) % stride == 0


class EpochChooser:
    """Chooses each head's epoch on val: the latest checkpoint whose val
    score is within one standard error of the best so far.

    The val curve of a converging head is flat at its end, where differences
    between epochs are val's sampling noise; taking the maximum of such noise
    would pick an arbitrary, often early and unconverged, epoch. So the best
    epoch only wins over a later one when it is better by more than its
    standard error (:func:`mean_class_score`): early stopping is kept where
    val shows it helps, and otherwise the converged weights are. Online: call
    :meth:`update` after every epoch; it returns the heads whose current
    weights become their choice.
    """

    def __init__(self, num_heads: int, epochs: int) -> None:
        self.best = [-1.0] * num_heads
        self.error = [0.0] * num_heads
        self.epochs = [epochs] * num_heads  # 1-based, the choice
        self.scores = [-1.0] * num_heads
        self.histories: List[List[float]] = [[] for _ in range(num_heads)]

    def update(self, epoch: int, scores: Sequence[float], errors: Sequence[float]) -> List[int]:
        """Record ``epoch``'s (0-based) val scores and their errors; returns
        the heads whose choice is now this epoch."""
        taken = []
        for k, (score, error) in enumerate(zip(scores, errors)):
            score, error = float(score), float(error)
            self.histories[k].append(score)
            if score > self.best[k]:
                self.best[k], self.error[k] = score, error
            elif score < self.best[k] - self.error[k]:
                continue
            self.epochs[k], self.scores[k] = epoch + 1, score
            taken.append(k)
        return taken


#: Below this many multiply-adds per training step (B * D * K * C) a CPU
#: trains on one thread: on small problems thread synchronisation costs more
#: than it saves (tenfold on a busy 2-core machine).
SMALL_STEP_MACS = 8_000_000


@contextmanager
def cpu_threads_for(device: str, macs_per_step: float):
    """Run the block on one torch thread when ``device`` is the CPU and the
    steps are small (SMALL_STEP_MACS); otherwise leave threading alone."""
    import torch

    if torch.device(device).type != "cpu" or macs_per_step >= SMALL_STEP_MACS:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_optimizer(groups: Sequence[Mapping[str, Any]], train: TrainConfig, *, fused: Optional[bool] = None):
    """The torch optimizer of ``train.optimizer`` over parameter ``groups``
    (each may set its own weight_decay), at ``train.lr``."""
    import torch

    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, fused=fused)
    # The fused kernels update every element in one pass: a sixth of the
    # step-by-step update's time on a CPU, where it is a quarter of a step.
    kind = torch.optim.Adam if train.optimizer == "adam" else torch.optim.AdamW
    return kind(groups, lr=train.lr, fused=_fused_adam_supported(groups))


def _fused_adam_supported(groups: Sequence[Mapping[str, Any]]) -> Optional[bool]:
    """True where torch has fused Adam kernels for these parameters (float32 on
    the CPU since torch 2.4, or on CUDA), else None (the default update)."""
    import torch

    params = [param for group in groups for param in group["params"]]
    devices = {param.device.type for param in params}
    dtypes = {param.dtype for param in params}
    if dtypes != {torch.float32} or not devices <= {"cpu", "cuda"}:
        return None
    if "cpu" in devices and tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 4):
        return None
    return True


def train_heads(
    data: PreparedData,
    losses: Sequence[Any],
    *,
    sampler: Any,
    family: str = "linear",
    logit_scales: Optional[Sequence[float]] = None,
    seed: int = 0,
    train: TrainConfig = TrainConfig(),
) -> List[TrainedWeights]:
    """Train one head per loss in a single pass over ``data`` (the fused trainer).

    ``losses``: K LongTailLoss modules; ``sampler``: a ClassSampler over the
    training labels; ``family``: "linear" (logits = x W^T + b) or "cosine"
    (logits = s_k * cos(x, w), ``logit_scales`` s_k per head). Every head
    starts from the same weights drawn from ``seed``. Returns K
    :class:`TrainedWeights`, each at its best val epoch.

    ``train.precision`` "bfloat16" is mixed precision: the features are cast
    to bfloat16 once, and each step casts the float32 (master) weights to
    bfloat16 for the logits product, whose backward (the weight gradient)
    then also runs in bfloat16 with float32 accumulation inside the kernel;
    the logits are lifted to float32 before the bias, the cosine scale and
    the losses, and the gradient is lifted to float32 before the optimiser,
    whose weights and state stay float32. The per-epoch val scoring that
    picks the epoch uses the same bfloat16 product; the val and test metrics
    reported later come from the float32 head.
    """
    import torch
    import torch.nn.functional as F

    train = train.validated()
    if family not in FAMILIES:
        raise ConfigError(f"head family must be one of {', '.join(FAMILIES)}; got {family!r}")
    num_heads = len(losses)
    if num_heads == 0:
        return []
    device = data.device
    num_classes = data.num_classes
    dim = data.x.shape[1]
    cosine = family == "cosine"
    scales = torch.tensor(
        list(logit_scales) if logit_scales is not None else [1.0] * num_heads,
        dtype=torch.float32,
        device=device,
    ).repeat_interleave(num_classes)
    x_train = data.normalized("train") if cosine else data.x
    x_val = data.normalized("val") if cosine else data.x_val
    has_val = x_val is not None
    # Cast once, not per batch; .to() is a no-op in float32.
    compute_dtype = torch.bfloat16 if train.resolved_precision() == "bfloat16" else torch.float32
    mixed = compute_dtype != torch.float32
    x_train = x_train.to(compute_dtype)
    x_val = None if x_val is None else x_val.to(compute_dtype)

    generator = torch.Generator().manual_seed(int(seed))
    initial = torch.randn(num_classes, dim, generator=generator)
    # Cosine weights start as unit vectors: their norm sets the step size of
    # their direction. Linear weights start near zero (uniform logits).
    initial = F.normalize(initial, dim=1) if cosine else initial.mul_(0.01 / FEATURE_NORM)
    # (K * C, D), nn.Linear's layout: head k owns rows k*C .. (k+1)*C - 1.
    weight = initial.repeat(num_heads, 1).to(device).requires_grad_(True)
    parameters = [weight]
    bias = None
    if not cosine:
        bias = torch.zeros(num_heads * num_classes, device=device, requires_grad=True)
        parameters.append(bias)
    # The penalty of the linear family's weights (not its bias); the cosine
    # family's loss does not depend on its weights' norm, so it has none.
    groups = [{"params": [weight], "weight_decay": 0.0 if cosine else train.weight_decay}]
    if bias is not None:
        groups.append({"params": [bias], "weight_decay": 0.0})
    # The fused SGD kernel saves about a tenth of a bf16 step, but its
    # rounding differs from the per-tensor update's in float32.
    optimizer = make_optimizer(groups, train, fused=True if mixed else None)
    losses = [loss.to(device) for loss in losses]
    for loss in losses:
        loss.reseed(int(seed))

    def logits_of(x):
        if mixed:
            directions = F.normalize(weight, dim=1) if cosine else weight
            logits = F.linear(x, directions.to(compute_dtype)).float()
            return logits * scales if cosine else logits + bias
        if cosine:
            return F.linear(x, F.normalize(weight, dim=1)) * scales
        return F.linear(x, weight, bias)

    num_rows = len(data.y)
    epochs = train.epochs_for(num_rows)
    if sampler.total_epochs != epochs:
        raise ConfigError(
            f"the sampler was built for {sampler.total_epochs} epochs but training runs {epochs}; "
            f"build it with total_epochs=train.epochs_for(N)"
        )
    steps_per_epoch = -(-len(sampler) // train.batch_size)
    total_steps = epochs * steps_per_epoch
    chooser = EpochChooser(num_heads, epochs)
    best_weight = best_bias = None
    step = 0
    macs_per_step = min(train.batch_size, num_rows) * dim * num_heads * num_classes
    with cpu_threads_for(device, macs_per_step):
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for loss in losses:
                loss.set_epoch(epoch, epochs)
            order = sampler.epoch_indices().to(device)
            for start in range(0, len(order), train.batch_size):
                batch = order[start : start + train.batch_size]
                lr = 0.5 * train.lr * (1.0 + math.cos(math.pi * step / total_steps))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                logits = logits_of(x_train.index_select(0, batch))
                target = data.y.index_select(0, batch)
                # unbind: one backward op for all heads, where slicing would zero-fill K times.
                per_head = logits.view(-1, num_heads, num_classes).unbind(1)
                total = losses[0](per_head[0], target)
                for k in range(1, num_heads):
                    total = total + losses[k](per_head[k], target)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                step += 1
            if has_val and is_checkpoint(epoch, epochs):
                with torch.no_grad():
                    predictions = logits_of(x_val).view(-1, num_heads, num_classes).argmax(dim=2)
                    scores, errors = mean_class_score(predictions, data.y_val, num_classes, with_error=True)
                taken = chooser.update(epoch, scores.tolist(), errors.tolist())
                if taken:
                    with torch.no_grad():
                        if best_weight is None:
                            best_weight = weight.detach().clone()
                            best_bias = None if bias is None else bias.detach().clone()
                        else:
                            for k in taken:
                                block = slice(k * num_classes, (k + 1) * num_classes)
                                best_weight[block] = weight[block]
                                if bias is not None:
                                    best_bias[block] = bias[block]
    if not has_val:
        best_weight = weight.detach()
        best_bias = None if bias is None else bias.detach()
    results = []
    for k in range(num_heads):
        block = slice(k * num_classes, (k + 1) * num_classes)
        head_weight = best_weight[block].clone()
        if cosine:
            head_weight = F.normalize(head_weight, dim=1)
        results.append(
            TrainedWeights(
                family=family,
                weight=head_weight,
                bias=None if best_bias is None else best_bias[block].clone(),
                logit_scale=float(scales[k * num_classes]) if cosine else 1.0,
                epoch=chooser.epochs[k],
                val_score=chooser.scores[k] if has_val else None,
                selected_on="val" if has_val else "last_epoch",
                history=chooser.histories[k],
            )
        )
    return results


# ---------------------------------------------------------------------------
# Fitting cells.
# ---------------------------------------------------------------------------


def _label_of(feature_set) -> str:
    return str(feature_set.path) if feature_set.path is not None else "<in memory>"


def _score_head(head, feature_set, train: TrainConfig) -> Dict[str, Dict[str, Any]]:
    counts = feature_set.train_counts
    metrics = {}
    for name in feature_set.eval_splits:
        split = feature_set.splits[name]
        scores = head.decision_function(split.features)
        metrics[name] = evaluate(
            split.labels,
            scores,
            counts,
            many_threshold=train.many_threshold,
            few_threshold=train.few_threshold,
        )
    return metrics


@dataclass
class _Plan:
    """A validated cell with its head object and resolved settings."""

    index: int
    cell: Cell
    head: Any
    settings: Dict[str, Dict[str, Any]]
    weight_index: int = -1  # which of its group's trained weights it uses


def fit_cells(
    feature_set,
    cells: Sequence[Cell],
    *,
    train: TrainConfig = TrainConfig(),
    on_result: Optional[Callable[[CellResult], None]] = None,
    progress: bool = False,
) -> List[CellResult]:
    """Fit every cell on ``feature_set`` and score every split but train.

    Gradient-trained cells sharing (sampler, sampler settings, seed, weight
    family) train in one fused pass (module docstring); cells whose weights
    would be identical (e.g. linear, tau_norm and lws with the same loss)
    share them. A fused pass's wall time is shared equally by the weights it
    trains. ``on_result`` is called with each result as it is ready; the
    returned list follows the order of ``cells``. All cells are validated
    before any training starts.
    """
    from decouple.stage_two.heads import create_head

    train = train.validated().for_rows(len(feature_set.splits["train"]))
    device = train.resolved_device()
    plans: List[_Plan] = []
    for index, cell in enumerate(cells):
        cell = validate_cell(cell)
        settings = method_params(cell)
        head = create_head(cell.head, **settings["head"])
        plans.append(_Plan(index=index, cell=cell, head=head, settings=settings))
    # Build every loss and sampler once up front so a bad setting fails before training.
    counts = feature_set.train_counts
    for plan in plans:
        if plan.head.trainable:
            plan.head.check_settings(
                plan.cell.loss, plan.cell.sampler, plan.settings, class_counts=counts, train=train
            )

    results: List[Optional[CellResult]] = [None] * len(plans)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plans), unit="cell", desc=_label_of(feature_set), leave=False)

    def finish(plan: _Plan, seconds: float) -> None:
        metrics = _score_head(plan.head, feature_set, train)
        params = {
            "head": plan.head.get_params(),
            **plan.head.selection_(),
        }
        if plan.head.trainable:
            params["loss"] = plan.head.loss_params_
            params["sampler"] = plan.head.sampler_params_
            params["train"] = train.to_dict()
        result = CellResult(
            features=_label_of(feature_set),
            head=plan.cell.head,
            loss=plan.cell.loss,
            sampler=plan.cell.sampler,
            seed=plan.cell.seed,
            params=params,
            fit_seconds=seconds,
            metrics=metrics,
        )
        results[plan.index] = result
        if on_result is not None:
            on_result(result)
        if bar is not None:
            bar.update(1)

    train_split = feature_set.splits["train"]
    val_split = feature_set.splits.get("val")
    data = None
    groups: Dict[Tuple, List[_Plan]] = {}
    for plan in plans:
        if not plan.head.trainable:
            start = time.perf_counter()
            plan.head.fit(
                train_split.features,
                train_split.labels,
                num_classes=feature_set.num_classes,
            )
            finish(plan, time.perf_counter() - start)
            continue
        key = (
            plan.cell.sampler,
            _freeze(plan.settings["sampler"]),
            plan.cell.seed,
            plan.head.weight_family(),
        )
        groups.setdefault(key, []).append(plan)

    try:
        for (sampler_name, _, seed, family_key), members in groups.items():
            if data is None:
                data = PreparedData.from_arrays(
                    train_split.features,
                    train_split.labels,
                    val_features=None if val_split is None else val_split.features,
                    val_labels=None if val_split is None else val_split.labels,
                    num_classes=feature_set.num_classes,
                    device=device,
                )
            _fit_group(data, members, sampler_name, seed, family_key, train, finish)
    finally:
        if bar is not None:
            bar.close()
    return [result for result in results if result is not None]


def _fit_group(data, members, sampler_name, seed, family_key, train, finish) -> None:
    from decouple.stage_two.losses import create_loss
    from decouple.stage_two.samplers import create_sampler

    start = time.perf_counter()
    # Weights are shared by cells whose loss and loss settings agree.
    weight_keys: Dict[Tuple, int] = {}
    losses = []
    logit_scales = []
    for plan in members:
        loss_params = plan.head.training_loss_params(plan.cell.loss, plan.settings["loss"])
        key = (plan.cell.loss, _freeze(loss_params))
        if key not in weight_keys:
            weight_keys[key] = len(losses)
            losses.append(create_loss(plan.cell.loss, class_counts=data.class_counts, **loss_params))
            logit_scales.append(plan.head.training_logit_scale(losses[-1]))
        plan.weight_index = weight_keys[key]
    sampler = create_sampler(
        sampler_name,
        data.y.cpu().numpy(),
        total_epochs=train.epochs,
        seed=seed,
        **members[0].settings["sampler"],
    )
    trained = train_heads(
        data,
        losses,
        sampler=sampler,
        family=family_key[0],
        logit_scales=logit_scales,
        seed=seed,
        train=train,
    )
    shared_seconds = (time.perf_counter() - start) / max(len(trained), 1)
    for plan in members:
        own_start = time.perf_counter()
        plan.head.fit_from_weights(
            trained[plan.weight_index],
            data,
            loss=plan.cell.loss,
            sampler=plan.cell.sampler,
            loss_params=plan.settings["loss"],
            sampler_params=plan.settings["sampler"],
            seed=seed,
            train=train,
        )
        finish(plan, shared_seconds + time.perf_counter() - own_start)


def fit_cell(feature_set, cell: Cell, *, train: TrainConfig = TrainConfig()) -> CellResult:
    """Fit and score one cell (:func:`fit_cells` with a single cell)."""
    return fit_cells(feature_set, [cell], train=train)[0]


def fit_file(path, cell: Cell, *, train: TrainConfig = TrainConfig()) -> CellResult:
    """Validate ``cell`` and ``train``, read the feature file at ``path`` and fit the cell.

    Names and settings are checked before the file is read, so a typo fails at once.
    """
    from decouple.features import read_features

    cell = validate_cell(cell)
    train = train.validated()
    return fit_cell(read_features(path), cell, train=train)
