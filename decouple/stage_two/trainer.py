"""The fused trainer: K classifier heads trained in one pass over cached features.

Kang et al., "Decoupling Representation and Classifier for Long-Tailed
Recognition" (ICLR 2020): the representation is fixed and only the
classifier is relearned. Heads that share a sampler, a seed and a weight
family train *together*, the way DINOv2's linear probe trains many heads at
once: the K heads' parameters sit stacked in K equal blocks (a (K * C, D)
weight matrix for the linear family), so one product gives every head's
logits, each head's loss is applied to its own slice and the summed losses
are backpropagated. Heads share no parameter, so the gradient of head k is
that of its own loss: K separate trainings on the same batches from the
same initialisation, in one pass. (The optimisers' updates are
element-wise, so Adam, SGD and AdamW keep that equivalence.)

What is trained is open: a :class:`WeightFamily` declares the parameters,
the inputs and the logit function, and the trainer knows no family by name
(the linear, cosine and LWS families live beside their heads in
:mod:`decouple.stage_two.heads`).

* Features are standardised with train statistics (:class:`PreparedData`).
* Adam (or SGD with momentum, or AdamW) under a cosine learning-rate
  schedule, batches drawn from the sampler's ``epoch_indices()``, for the
  step budget of :class:`~decouple.stage_two.config.TrainConfig`.
* At most VAL_CHECKS epochs are scored on val (one product for all heads)
  by mean per-class accuracy, and :class:`EpochChooser` keeps the latest
  epoch within one standard error of its best; never test. Without val the
  last epoch is kept (``selected_on`` "last_epoch").
* The same seed gives the same numbers on the CPU: initial parameters come
  from ``seed``, batches from the sampler's (seed, epoch) draws, and a loss
  that draws random numbers draws them from its own generator
  (``LongTailLoss.reseed``), so a fused pass equals separate runs.
* On the CPU, small problems train on one thread (SMALL_STEP_MACS).
* ``precision`` "bfloat16" runs the two large products of a step in
  bfloat16, with float32 master weights, optimiser state and losses.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from decouple.errors import ConfigError
from decouple.stage_two.config import TrainConfig

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

    def normalized(self, which: str):
        """The standardised rows of train ("train") or val ("val") scaled to
        unit L2 norm, (N, D): the cosine family's inputs; computed once."""
        if which not in self._normalized:
            source = self.x if which == "train" else self.x_val
            self._normalized[which] = None if source is None else F.normalize(source, dim=1)
        return self._normalized[which]


class WeightFamily:
    """What the fused trainer trains for K heads: parameters, inputs and logits.

    A trainable head names its family (``TrainableHead.weight_family``);
    a new kind of head is a new family, with no edit to the trainer.
    Every parameter is stacked along dim 0 in K equal blocks, block k
    belonging to head k, so the trainer keeps each head's chosen epoch by
    copying its blocks.
    """

    def inputs(self, data: "PreparedData", split: str) -> Optional[torch.Tensor]:
        """The rows the logits are computed from, (N, D_in), for "train" or
        "val" (None without val); the standardised features by default."""
        return data.x if split == "train" else data.x_val

    def parameters(
        self, num_heads: int, num_classes: int, dim: int, *, generator: torch.Generator, device: str,
        train: TrainConfig,
    ) -> Tuple[Dict[str, torch.Tensor], List[Dict[str, Any]]]:
        """Initial parameters {name: tensor stacked in ``num_heads`` blocks},
        every head starting alike (random draws from ``generator``), and the
        optimiser's parameter groups (each with its weight_decay)."""
        raise NotImplementedError  # pragma: no cover

    def logits(self, x: torch.Tensor, params: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Logits (B, K * C) of rows ``x`` (B, D_in), head k in columns
        k*C .. (k+1)*C - 1; the large product in ``dtype``, the result float32."""
        raise NotImplementedError  # pragma: no cover

    def head_params(self, params: Mapping[str, torch.Tensor], k: int, num_heads: int) -> Dict[str, Any]:
        """Head k's trained parameters, from the kept ``params``: block k of each."""
        return {name: head_block(value, k, num_heads).clone() for name, value in params.items()}

    def project(self, params: Mapping[str, torch.Tensor]) -> None:
        """Project the parameters back onto their constraint set after every
        optimiser step, in place (projected gradient descent); none by default."""

    def macs_per_step(self, rows: int, dim: int, num_heads: int, num_classes: int) -> float:
        """Multiply-adds of one step's logits (decides the CPU thread count)."""
        return rows * dim * num_heads * num_classes


def head_block(value: torch.Tensor, k: int, num_heads: int) -> torch.Tensor:
    """Block k of a parameter stacked in ``num_heads`` equal blocks along dim 0 (a view)."""
    size = value.shape[0] // num_heads
    return value[k * size : (k + 1) * size]


@dataclass
class TrainedWeights:
    """One trained head of a fused pass, in its family's input space.

    ``params`` its parameters (:meth:`WeightFamily.head_params`; "weight"
    (C, D) and "bias" (C,) for the linear family), ``epoch`` the kept epoch
    (1-based), ``val_score`` its val mean per-class accuracy (None without
    val), ``selected_on`` "val" or "last_epoch", ``history`` the val scores.
    """

    params: Dict[str, Any]
    epoch: int
    val_score: Optional[float]
    selected_on: str
    history: List[float] = field(default_factory=list)


def mean_class_score(predictions, labels, num_classes: int, *, with_error: bool = False):
    """Mean per-class accuracy of each column of ``predictions`` (N, K) -> (K,),
    on the training device (scikit-learn would copy every checkpoint to the host).

    ``with_error``: also its standard error (K,), sqrt(sum_c a_c (1 - a_c) /
    n_c) / C over the C classes present, with a_c the class's accuracy on its
    n_c images (independent binomial classes)."""
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
    (each may set its own weight_decay), at ``train.lr``.

    torch's classes directly: timm's ``create_optimizer_v2`` would map "sgd"
    to Nesterov SGD and adds nothing for explicit parameter groups."""
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, fused=fused)
    # The fused kernels update every element in one pass: a sixth of the
    # step-by-step update's time on a CPU, where it is a quarter of a step.
    kind = torch.optim.Adam if train.optimizer == "adam" else torch.optim.AdamW
    return kind(groups, lr=train.lr, fused=_fused_adam_supported(groups))


def _fused_adam_supported(groups: Sequence[Mapping[str, Any]]) -> Optional[bool]:
    """True where torch has fused Adam kernels for these parameters (float32 on
    the CPU since torch 2.4, or on CUDA), else None (the default update)."""
    params = [param for group in groups for param in group["params"]]
    devices = {param.device.type for param in params}
    dtypes = {param.dtype for param in params}
    if dtypes != {torch.float32} or not devices <= {"cpu", "cuda"}:
        return None
    if "cpu" in devices and tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 4):
        return None
    return True


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """The learning rate of ``step`` (0-based) under a cosine schedule from
    ``base_lr`` to 0 over ``total_steps``, in closed form (torch's
    CosineAnnealingLR is recursive, which drifts from it in the last bits)."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * step / total_steps))


class _KeptBlocks:
    """Each head's parameters at its chosen epoch: the blocks of the heads
    :meth:`EpochChooser.update` takes are copied from the live parameters."""

    def __init__(self, params: Mapping[str, torch.Tensor], num_heads: int) -> None:
        self.live = params
        self.num_heads = num_heads
        self.kept: Optional[Dict[str, torch.Tensor]] = None

    @torch.no_grad()
    def take(self, heads: Sequence[int]) -> None:
        if not heads:
            return
        if self.kept is None:
            self.kept = {name: value.detach().clone() for name, value in self.live.items()}
            return
        for name, value in self.live.items():
            for k in heads:
                head_block(self.kept[name], k, self.num_heads)[...] = head_block(value, k, self.num_heads)

    def final(self) -> Dict[str, torch.Tensor]:
        """The kept blocks, or the live parameters when none were taken (no val)."""
        if self.kept is not None:
            return self.kept
        return {name: value.detach() for name, value in self.live.items()}


def _epochs_of(sampler: Any, train: TrainConfig, num_rows: int) -> int:
    epochs = train.epochs_for(num_rows)
    if sampler.total_epochs != epochs:
        raise ConfigError(
            f"the sampler was built for {sampler.total_epochs} epochs but training runs {epochs}; "
            f"build it with total_epochs=train.epochs_for(N)"
        )
    return epochs


def with_synthetic_rows(data: PreparedData, sampler: Any) -> PreparedData:
    """``data`` with the training rows a feature-synthesising sampler adds
    (``sampler.augment``, e.g. calibrated_features): train x and y extended
    by its M rows (N + M, D), labelled by the tail of ``sampler.labels``;
    val, the standardisation and ``class_counts`` (the real counts, which
    the losses and post-fit steps use) unchanged."""
    synthetic = sampler.augment(data.x)
    labels = torch.as_tensor(np.asarray(sampler.labels[len(data.y) :]), dtype=torch.int64, device=data.device)
    return replace(data, x=torch.cat([data.x, synthetic]), y=torch.cat([data.y, labels]), _normalized={})


def train_heads(
    data: PreparedData,
    losses: Sequence[Any],
    *,
    sampler: Any,
    family: WeightFamily,
    seed: int = 0,
    train: TrainConfig = TrainConfig(),
) -> List[TrainedWeights]:
    """Train one head per loss in a single pass over ``data`` (the fused trainer).

    ``losses``: K LongTailLoss modules; ``sampler``: a ClassSampler over the
    training labels built for ``train.epochs_for(N)`` epochs; ``family``:
    the :class:`WeightFamily` of the K heads. Every head starts from the
    same parameters drawn from ``seed``. Returns K :class:`TrainedWeights`,
    each at its chosen epoch. A sampler that synthesises features
    (``synthesizes_features``) first adds its rows to the training split
    (:func:`with_synthetic_rows`), which every family's inputs then include;
    the epochs are those of the N real rows.

    ``train.precision`` "bfloat16" is mixed precision: the inputs are cast to
    bfloat16 once and the family computes the large product in bfloat16 (its
    backward, the weight gradient, too, with float32 accumulation inside the
    kernel), lifting the logits to float32 for the bias, the scale and the
    losses; parameters and optimiser state stay float32. The per-epoch val
    scoring that picks the epoch uses the same product; the reported metrics
    come from the float32 head.
    """
    train = train.validated()
    num_heads = len(losses)
    if num_heads == 0:
        return []
    epochs = _epochs_of(sampler, train, len(data.y))
    if getattr(sampler, "synthesizes_features", False):
        data = with_synthetic_rows(data, sampler)
    dtype = torch.bfloat16 if train.resolved_precision() == "bfloat16" else torch.float32
    # Cast once, not per batch; .to() is a no-op in float32.
    inputs = [family.inputs(data, split) for split in ("train", "val")]
    x_train, x_val = [None if x is None else x.to(dtype) for x in inputs]
    generator = torch.Generator().manual_seed(int(seed))
    params, groups = family.parameters(
        num_heads, data.num_classes, x_train.shape[1], generator=generator, device=data.device, train=train
    )
    # The fused SGD kernel saves about a tenth of a bf16 step, but its
    # rounding differs from the per-tensor update's in float32.
    optimizer = make_optimizer(groups, train, fused=True if dtype != torch.float32 else None)
    losses = [loss.to(data.device) for loss in losses]
    for loss in losses:
        loss.reseed(int(seed))
    chooser = EpochChooser(num_heads, epochs)
    kept = _KeptBlocks(params, num_heads)
    rows = min(train.batch_size, len(data.y))
    with cpu_threads_for(data.device, family.macs_per_step(rows, x_train.shape[1], num_heads, data.num_classes)):
        step = 0
        for epoch in range(epochs):
            step = _train_epoch(family, params, optimizer, losses, sampler, x_train, data.y, epoch=epoch,
                                epochs=epochs, step=step, dtype=dtype, train=train)
            if x_val is not None and is_checkpoint(epoch, epochs):
                kept.take(chooser.update(epoch, *_val_scores(family, params, x_val, data, num_heads, dtype)))
    final, has_val = kept.final(), x_val is not None
    return [
        TrainedWeights(
            params=family.head_params(final, k, num_heads),
            epoch=chooser.epochs[k],
            val_score=chooser.scores[k] if has_val else None,
            selected_on="val" if has_val else "last_epoch",
            history=chooser.histories[k],
        )
        for k in range(num_heads)
    ]


@torch.no_grad()
def _val_scores(family, params, x_val, data: PreparedData, num_heads: int, dtype) -> Tuple[List[float], List[float]]:
    """Each head's val mean per-class accuracy and its standard error."""
    predictions = family.logits(x_val, params, dtype).view(len(x_val), num_heads, -1).argmax(dim=2)
    scores, errors = mean_class_score(predictions, data.y_val, data.num_classes, with_error=True)
    return scores.tolist(), errors.tolist()


def _train_epoch(family, params, optimizer, losses, sampler, x_train, y_train, *, epoch: int, epochs: int,
                 step: int, dtype, train: TrainConfig) -> int:
    """One epoch of the fused pass; returns the step count after it."""
    num_heads = len(losses)
    total_steps = epochs * -(-len(sampler) // train.batch_size)
    sampler.set_epoch(epoch)
    for loss in losses:
        loss.set_epoch(epoch, epochs)
    order = sampler.epoch_indices().to(x_train.device)
    for start in range(0, len(order), train.batch_size):
        batch = order[start : start + train.batch_size]
        lr = cosine_lr(train.lr, step, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = family.logits(x_train.index_select(0, batch), params, dtype)
        target = y_train.index_select(0, batch)
        # unbind: one backward op for all heads, where slicing would zero-fill K times.
        per_head = logits.view(len(batch), num_heads, -1).unbind(1)
        total = losses[0](per_head[0], target)
        for k in range(1, num_heads):
            total = total + losses[k](per_head[k], target)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        family.project(params)
        step += 1
    return step
