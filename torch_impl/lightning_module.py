"""The thin `LightningModule`s: loss, metrics and optimizer; the architecture is a plain `nn.Module`.

`ClassifierModule` trains one catalog model (or N members of one) with the tutorial's optimizer in its Keras /
TF1 semantics. With `members > 1` it is tutorial 001's ensemble: one optimizer shared by all members, stepped
once per member per batch (manual optimization, because that is what the tutorial's loop does), prediction =
the sum of the members' logits (or the mean of their probabilities, or a majority vote).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from parity.catalog import get_spec
from torch_impl.models import Ensemble, build_member, model_logits
from torch_impl.optim import KerasAdam, KerasRMSprop, exponential_decay_lambda

COMBINE = ("logits", "probs", "vote")


def combine_members(member_logits: list[torch.Tensor], combine: str = "logits") -> torch.Tensor:
    """Ensemble scores: sum of logits (the tutorial), mean of probabilities, or votes per class."""
    stacked = torch.stack(member_logits)  # (M, B, classes)
    if combine == "logits":
        return stacked.sum(0)
    if combine == "probs":
        return stacked.softmax(-1).mean(0)
    if combine == "vote":
        votes = F.one_hot(stacked.argmax(-1), stacked.shape[-1]).sum(0).float()  # (B, classes)
        return votes + stacked.softmax(-1).mean(0) * 1e-3  # ties broken by the mean probability
    raise ValueError(f"unknown combine {combine!r}; choose one of: {', '.join(COMBINE)}")


def build_optimizer(parameters, optimizer: str = "adam", lr: float = 1e-3, epsilon: float = 1e-7):
    """The recipe's optimizer with Keras / TF1 numerics (see torch_impl/optim.py for what differs from torch's)."""
    if optimizer == "rmsprop":
        return KerasRMSprop(parameters, lr=lr, rho=0.9, epsilon=epsilon)
    if optimizer == "adam":
        return KerasAdam(parameters, lr=lr, epsilon=epsilon)
    raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adam' or 'rmsprop'")


class ClassifierModule(L.LightningModule):
    """Args:
    model_name: a catalog name (`parity summary` lists them); `cnn_ensemble3` means members=3 of `cnn`.
    members: number of independently initialized members (1: a single model).
    optimizer: "adam" (Keras/TF1 Adam: epsilon added after the bias correction) or "rmsprop" (Keras RMSprop).
    lr, epsilon: the optimizer's rate and epsilon (Keras 1e-7, TF1 1e-8).
    lr_decay_rate, lr_decay_epochs: ExponentialDecay(lr, decay_steps = lr_decay_epochs * batches per epoch,
        lr_decay_rate, staircase=True), evaluated at the optimizer's step counter, stepped per optimizer step.
    combine: how the ensemble predicts ("logits": sum of logits as the tutorial; "probs"; "vote").
    train_acc_after_step: tutorial 001 measures train accuracy in eval mode after the step, on the same batch.
    """

    def __init__(self, model_name: str = "cnn", members: int = 1, optimizer: str = "adam", lr: float = 1e-3,
                 epsilon: float = 1e-7, lr_decay_rate: float | None = None, lr_decay_epochs: float | None = None,
                 combine: str = "logits", train_acc_after_step: bool = False, num_classes: int = 10):
        super().__init__()
        spec = get_spec(model_name)
        if spec.members > 1:
            members = spec.members if members == 1 else members
        if optimizer not in ("adam", "rmsprop"):
            raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adam' or 'rmsprop'")
        if combine not in COMBINE:
            raise ValueError(f"unknown combine {combine!r}; choose one of: {', '.join(COMBINE)}")
        self.save_hyperparameters()
        self.model = Ensemble(lambda: build_member(model_name), members=members)
        # One optimizer shared by all members means stepping it once per member: manual optimization.
        self.automatic_optimization = members == 1
        self.train_loss = MeanMetric()
        self.train_acc = MeanMetric()  # the mean of per-batch accuracies, as the tutorials average them
        self.eval_loss = nn.ModuleDict({k: MeanMetric() for k in ("val", "test")})
        self.eval_acc = nn.ModuleDict({k: MulticlassAccuracy(num_classes, average="micro") for k in ("val", "test")})
        self.member_acc = nn.ModuleList(MulticlassAccuracy(num_classes, average="micro") for _ in range(members))
        self.eval_names: list[str] = ["val", "test"]

    # ------------------------------------------------------------------ forward
    @property
    def members(self) -> nn.ModuleList:
        return self.model.members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Ensemble scores (for one member: its logits)."""
        return combine_members([model_logits(m, x) for m in self.members], self.hparams.combine)

    def _member_loss(self, member: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model_logits(member, x)  # a softmax model's loss comes from its logits: log-softmax + NLL
        return F.cross_entropy(logits, y), logits

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.automatic_optimization:
            loss, logits = self._member_loss(self.members[0], x, y)
            acc = (logits.argmax(-1) == y).float().mean()
            self._log_train(loss.detach(), acc)
            return loss
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        losses, logits = [], []
        for member in self.members:  # the tutorial's loop: one apply_gradients per member, same optimizer
            loss, member_logits = self._member_loss(member, x, y)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.detach())
            logits.append(member_logits.detach())
        acc = (combine_members(logits, self.hparams.combine).argmax(-1) == y).float().mean()
        self._log_train(torch.stack(losses).mean(), acc)

    def _log_train(self, loss: torch.Tensor, acc: torch.Tensor) -> None:
        self.train_loss.update(loss)
        if not self.hparams.train_acc_after_step:
            self.train_acc.update(acc)
        self.log("train_loss", loss, prog_bar=True)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if not self.hparams.train_acc_after_step:
            return
        x, y = batch
        self.model.eval()  # tutorial 001: accuracy of the updated model, dropout off, on the batch just trained on
        with torch.no_grad():
            acc = (self(x).argmax(-1) == y).float().mean()
        self.model.train()
        self.train_acc.update(acc)

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y = batch
        name = self._eval_name(dataloader_idx)
        member_logits = [model_logits(m, x) for m in self.members]
        scores = combine_members(member_logits, self.hparams.combine)
        # the loss of the ensemble's summed logits, as the TF reference evaluates it
        loss = F.cross_entropy(combine_members(member_logits, "logits"), y)
        self.eval_loss[name].update(loss, weight=len(y))
        self.eval_acc[name].update(scores, y)
        if name == "test":
            for metric, logits in zip(self.member_acc, member_logits):
                metric.update(logits, y)

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx, dataloader_idx=len(self.eval_names) - 1)

    def _eval_name(self, dataloader_idx: int) -> str:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "eval_names", None) or self.eval_names
        return names[dataloader_idx] if len(names) > 1 else names[-1]

    def epoch_metrics(self, reset: bool = True) -> dict[str, float]:
        """This epoch's train / val / test numbers (history columns), computed across ranks."""
        row = {}
        for key, metric in (("train_loss", self.train_loss), ("train_acc", self.train_acc)):
            if metric.update_count:
                row[key] = float(metric.compute())
        for name in ("val", "test"):
            if self.eval_acc[name].update_count:
                row[f"{name}_loss"] = float(self.eval_loss[name].compute())
                row[f"{name}_acc"] = float(self.eval_acc[name].compute())
        if self.member_acc[0].update_count and len(self.member_acc) > 1:
            for i, metric in enumerate(self.member_acc):
                row[f"member{i}_test_acc"] = float(metric.compute())
        if reset:
            self.reset_epoch_metrics()
        return row

    def reset_epoch_metrics(self) -> None:
        for metric in (self.train_loss, self.train_acc, *self.eval_loss.values(), *self.eval_acc.values(),
                       *self.member_acc):
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        for name in ("val", "test"):
            if self.eval_acc[name].update_count:
                self.log(f"{name}_acc", self.eval_acc[name].compute(), prog_bar=True)
                self.log(f"{name}_loss", self.eval_loss[name].compute())

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(self.parameters(), hp.optimizer, hp.lr, hp.epsilon)
        if hp.lr_decay_rate is None:
            return optimizer
        steps_per_epoch = self.trainer.estimated_stepping_batches / max(self.trainer.max_epochs, 1)
        decay_steps = int(round(steps_per_epoch * hp.lr_decay_epochs))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, exponential_decay_lambda(hp.lr, decay_steps, hp.lr_decay_rate, staircase=True)
        )
        # Keras evaluates a schedule at every optimizer step; Lightning's default interval is the epoch
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @staticmethod
    def _check_model_name(checkpoint: dict, wanted: str) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("model_name")
        if saved is not None and saved != wanted:
            raise ValueError(
                f"this checkpoint holds a {saved!r} model, but a {wanted!r} model was asked for; "
                f"load it with model_name={saved!r} (parity train {saved} ...)"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Trainer.fit(ckpt_path=...) calls this before it loads the weights
        self._check_model_name(checkpoint, self.hparams.model_name)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's, plus a clear error for a checkpoint of another model (it loads the weights before
        `on_load_checkpoint`, which would fail with a wall of state-dict mismatches instead)."""
        if "model_name" in kwargs:
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
            cls._check_model_name(checkpoint, kwargs["model_name"])
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
