"""The thin `LightningModule`s: loss, metrics and optimizer; the architecture is a plain `nn.Module`.

`ClassifierModule` trains one catalog model (or N members of one) with the tutorial's optimizer in its Keras /
TF1 semantics. With `members > 1` it is tutorial 001's ensemble: one optimizer shared by all members, stepped
once per member per batch, prediction = the sum of the members' logits (or the mean of their probabilities, or a
majority vote). `ensemble_mode="loop"` runs the tutorial's loop (manual optimization, one member at a time);
"vectorized" runs all members in one pass (`VectorizedEnsemble`) and takes one optimizer step whose member axis
reproduces the shared optimizer's per-member step counter and learning rate (`KerasAdam(members=M)`).
"members" (member-parallel) is the ensemble the LightningCLI assembles after training each member in its own run
(`torch_impl.cli`); `Trainer.fit` does not train it.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from parity.catalog import get_spec
from torch_impl.models import Ensemble, build_member, model_logits
from torch_impl.models.vectorized import MEMBER_CLASSES, VectorizedEnsemble
from torch_impl.optim import ExponentialDecay, KerasAdam, KerasRMSprop, LearningRate, exponential_decay_lambda

COMBINE = ("logits", "probs", "vote")
ENSEMBLE_MODES = ("loop", "vectorized", "members")


def combine_members(member_logits: torch.Tensor | Sequence[torch.Tensor], combine: str = "logits") -> torch.Tensor:
    """Ensemble scores from per-member logits (M, B, classes): sum of logits (the tutorial), mean of
    probabilities, or votes per class."""
    stacked = member_logits if isinstance(member_logits, torch.Tensor) else torch.stack(member_logits)
    if combine == "logits":
        return stacked.sum(0)
    if combine == "probs":
        return stacked.softmax(-1).mean(0)
    if combine == "vote":
        votes = F.one_hot(stacked.argmax(-1), stacked.shape[-1]).sum(0).float()  # (B, classes)
        return votes + stacked.softmax(-1).mean(0) * 1e-3  # ties broken by the mean probability
    raise ValueError(f"unknown combine {combine!r}; choose one of: {', '.join(COMBINE)}")


def member_agreement(member_logits: torch.Tensor) -> torch.Tensor:
    """Per image (B,): whether every member predicts the same class."""
    predictions = member_logits.argmax(-1)  # (M, B)
    return (predictions == predictions[0]).all(0)


def build_optimizer(parameters, optimizer: str = "adam", lr: LearningRate = 1e-3, epsilon: float = 1e-7,
                    members: int = 1):
    """The recipe's optimizer with Keras / TF1 numerics (see torch_impl/optim.py for what differs from torch's).
    `members > 1`: the parameters stack that many members along dim 0 and share the optimizer's step counter."""
    if optimizer == "rmsprop":
        return KerasRMSprop(parameters, lr=lr, rho=0.9, epsilon=epsilon, members=members)
    if optimizer == "adam":
        return KerasAdam(parameters, lr=lr, epsilon=epsilon, members=members)
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
    second_pass: tutorial 001 runs each member forward again in training mode after its update and records that
        loss; the pass also updates BatchNorm's moving statistics a second time per batch (`bn_cnn`).
    ensemble_mode: for members > 1, "loop" (the tutorial's loop over members) or "vectorized" (all members in one
        pass and one optimizer step; members of `cnn` or `bn_cnn`). Both start from the same weights under the same
        seed and take the same steps (dropout masks aside: drawn in another order); checkpoints of one mode load in
        the other (the weights; resuming training needs the same mode). "members": each member trained in a run of
        its own, on every device in parallel, then assembled (the LightningCLI's `fit` does this; `Trainer.fit`
        refuses); evaluates and predicts as "loop".
    shared_optimizer: True (the tutorial): one optimizer whose step counter advances once per member per batch,
        which is also the schedule's step. False: each member its own optimizer and counter (the corrected
        ensemble; the schedule then counts batches).
    channels_last: keep the convolution weights (hence activations) in NHWC memory format, TensorFlow's layout.
        Same values; oneDNN's CPU convolutions run about 1.2x faster than in NCHW (BENCHMARKS.md), and it is the
        layout tensor cores want on a GPU. Checkpoints load either way.
    """

    def __init__(self, model_name: str = "cnn", members: int = 1, optimizer: str = "adam", lr: float = 1e-3,
                 epsilon: float = 1e-7, lr_decay_rate: float | None = None, lr_decay_epochs: float | None = None,
                 combine: str = "logits", train_acc_after_step: bool = False, num_classes: int = 10,
                 ensemble_mode: str = "loop", shared_optimizer: bool = True, channels_last: bool = True,
                 second_pass: bool = False):
        super().__init__()
        spec = get_spec(model_name)
        if spec.members > 1:
            members = spec.members if members == 1 else members
        if optimizer not in ("adam", "rmsprop"):
            raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adam' or 'rmsprop'")
        if combine not in COMBINE:
            raise ValueError(f"unknown combine {combine!r}; choose one of: {', '.join(COMBINE)}")
        if ensemble_mode not in ENSEMBLE_MODES:
            raise ValueError(f"unknown ensemble_mode {ensemble_mode!r}; choose one of: {', '.join(ENSEMBLE_MODES)}")
        self.member_name = spec.member or model_name
        self.vectorized = ensemble_mode == "vectorized" and members > 1
        if self.vectorized and self.member_name not in MEMBER_CLASSES:
            raise ValueError(f"ensemble_mode='vectorized' supports members of {', '.join(MEMBER_CLASSES)}, not "
                             f"{self.member_name!r} ({model_name}); use ensemble_mode='loop'")
        self.save_hyperparameters()
        # The vectorized model is converted from the looped one, so both modes draw the same initial weights.
        ensemble = Ensemble(lambda: build_member(model_name), members=members)
        self.model = VectorizedEnsemble.from_ensemble(ensemble) if self.vectorized else ensemble
        if channels_last:
            self.model.to(memory_format=torch.channels_last)  # 4-D weights only; `.to(device)` keeps the format
        # The loop steps a shared optimizer once per member (or each member's own): manual optimization.
        self.automatic_optimization = members == 1 or self.vectorized
        # Epoch means of the per-batch loss and accuracy, as the tutorials average them. nan_strategy="disable": a
        # diverged run shows a nan loss, as Keras does (the default raises), and no per-step isnan check waits for
        # the GPU.
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.train_acc = MeanMetric(nan_strategy="disable")
        self.eval_loss = nn.ModuleDict({k: MeanMetric() for k in ("val", "test")})
        self.eval_acc = nn.ModuleDict({k: MulticlassAccuracy(num_classes, average="micro") for k in ("val", "test")})
        self.member_acc = nn.ModuleList(MulticlassAccuracy(num_classes, average="micro") for _ in range(members))
        self.agreement = MeanMetric()  # fraction of test images on which all members predict the same class
        # the test accuracy of every combine rule, whichever one `combine` selects for test_acc
        self.rule_acc = nn.ModuleDict({rule: MulticlassAccuracy(num_classes, average="micro")
                                       for rule in (COMBINE if members > 1 else ())})
        self.eval_names: list[str] = ["val", "test"]

    # ------------------------------------------------------------------ forward
    @property
    def members(self) -> nn.ModuleList:
        """The members as ordinary modules. Vectorized: a copy (see `ensemble`); editing it changes nothing."""
        return self.ensemble().members

    def ensemble(self) -> Ensemble:
        """The model as an ordinary `Ensemble` (what `parity.interchange` and member-wise code expect): the model
        itself in loop mode, a converted copy in vectorized mode."""
        return self.model.to_ensemble() if self.vectorized else self.model

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits, (M, B, classes)."""
        if self.vectorized:
            return self.model(x)
        return torch.stack([model_logits(m, x) for m in self.model.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Ensemble scores (for one member: its logits)."""
        return combine_members(self.member_logits(x), self.hparams.combine)

    def _member_loss(self, member: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model_logits(member, x)  # a softmax model's loss comes from its logits: log-softmax + NLL
        return F.cross_entropy(logits, y), logits

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.ensemble_mode == "members" and self.hparams.members > 1:
            raise ValueError("ensemble_mode='members' trains each member in a run of its own: `python -m "
                             "torch_impl.cli fit ... --model.ensemble_mode=members` or `parity train MODEL "
                             "--ensemble-mode members`; Trainer.fit trains ensemble_mode 'loop' or 'vectorized'")

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.vectorized:
            logits = self.model(x)  # (M, B, classes)
            losses = F.cross_entropy(logits.transpose(1, 2), y.expand(len(logits), -1), reduction="none").mean(1)
            acc = (combine_members(logits.detach(), self.hparams.combine).argmax(-1) == y).float().mean()
            self._log_train(losses.detach().mean(), acc)
            # member k's parameters appear only in losses[k]: the sum gives each member its own loss's gradient
            return losses.sum()
        if self.automatic_optimization:
            loss, logits = self._member_loss(self.model.members[0], x, y)
            acc = (logits.argmax(-1) == y).float().mean()
            self._log_train(loss.detach(), acc)
            return loss
        optimizers, schedulers = self._member_optimizers()
        losses, logits = [], []
        # the tutorial's loop: one apply_gradients per member (on the shared optimizer, or on the member's own)
        for member, optimizer, scheduler in zip(self.model.members, optimizers, schedulers):
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

    def _member_optimizers(self) -> tuple[list, list]:
        """The looped ensemble's optimizer and scheduler for each member, in member order."""
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        members = len(self.model.members)
        if not isinstance(optimizers, list):  # one optimizer shared by all members
            return [optimizers] * members, [schedulers] * members
        return optimizers, schedulers if isinstance(schedulers, list) else [None] * members

    def _log_train(self, loss: torch.Tensor, acc: torch.Tensor) -> None:
        if not self.hparams.second_pass:  # else the second pass's loss, in on_train_batch_end
            self._log_train_loss(loss)
        if not self.hparams.train_acc_after_step:
            self.train_acc.update(acc)

    def _log_train_loss(self, loss: torch.Tensor) -> None:
        self.train_loss.update(loss)
        if self._loggers_write_this_step():
            # the per-step curve (the progress bar shows the epoch's running mean); under DDP the mean over the
            # ranks, i.e. the loss of the global batch: one all-reduce per written step, on the same step in all ranks
            self.log("train_loss", loss, sync_dist=True)

    def _loggers_write_this_step(self) -> bool:
        """Whether Lightning writes this batch's logged values to the loggers (every `log_every_n_steps` batches).

        `self.log` in every step costs about 6% of a 35 ms CPU step of `cnn` (BENCHMARKS.md) for values Lightning
        then drops on all other batches, so the per-step loss is logged only where it is written. With a Lightning
        that does not expose the decision, every step logs (the same curve, slower)."""
        trainer = self._trainer
        if trainer is None:
            return False
        if trainer.fast_dev_run:
            return True
        connector = getattr(trainer, "_logger_connector", None)
        if not isinstance(getattr(type(connector), "should_update_logs", None), property):
            return True
        return bool(connector.should_update_logs)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        x, y = batch
        if self.hparams.second_pass:
            # tutorial 001: `loss = loss_fn(model, images, labels)` after each member's update, in training mode (new
            # dropout masks; BatchNorm normalizes with this batch and updates its moving statistics again)
            with torch.no_grad():
                logits = self.member_logits(x)  # (M, B, classes)
                losses = F.cross_entropy(logits.transpose(1, 2), y.expand(len(logits), -1), reduction="none")
            self._log_train_loss(losses.mean(1).mean())
        if not self.hparams.train_acc_after_step:
            return
        self.model.eval()  # tutorial 001: accuracy of the updated model, dropout off, on the batch just trained on
        with torch.no_grad():
            acc = (self(x).argmax(-1) == y).float().mean()
        self.model.train()
        self.train_acc.update(acc)

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y = batch
        name = self._eval_name(dataloader_idx)
        member_logits = self.member_logits(x)  # (M, B, classes)
        scores = combine_members(member_logits, self.hparams.combine)
        # the loss of the ensemble's summed logits, as the TF reference evaluates it
        loss = F.cross_entropy(combine_members(member_logits, "logits"), y)
        self.eval_loss[name].update(loss, weight=len(y))
        self.eval_acc[name].update(scores, y)
        if name == "test":
            for metric, logits in zip(self.member_acc, member_logits):
                metric.update(logits, y)
            if len(member_logits) > 1:
                self.agreement.update(member_agreement(member_logits).float())
                for rule, metric in self.rule_acc.items():
                    metric.update(combine_members(member_logits, rule), y)

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
        if self.agreement.update_count:
            row["member_agreement"] = float(self.agreement.compute())
        for rule, metric in self.rule_acc.items():
            if metric.update_count:
                row[f"members_{rule}_test_acc"] = float(metric.compute())
        if reset:
            self.reset_epoch_metrics()
        return row

    def reset_epoch_metrics(self) -> None:
        for metric in (self.train_loss, self.train_acc, *self.eval_loss.values(), *self.eval_acc.values(),
                       *self.member_acc, self.agreement, *self.rule_acc.values()):
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        for name in ("val", "test"):
            if self.eval_acc[name].update_count:
                self.log(f"{name}_acc", self.eval_acc[name].compute(), prog_bar=True)
                self.log(f"{name}_loss", self.eval_loss[name].compute())

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        hp = self.hparams
        decay_steps = None
        if hp.lr_decay_rate is not None:
            steps_per_epoch = self.trainer.estimated_stepping_batches / max(self.trainer.max_epochs, 1)
            decay_steps = round(steps_per_epoch * hp.lr_decay_epochs)
        members = self.hparams.members
        if self.vectorized:
            # The schedule goes into the optimizer, which evaluates it at each member's own step (Keras's
            # LearningRateSchedule); a torch scheduler could only give all members of a step the same rate.
            lr = hp.lr if decay_steps is None else ExponentialDecay(hp.lr, decay_steps, hp.lr_decay_rate, True)
            return build_optimizer(self.parameters(), hp.optimizer, lr, hp.epsilon,
                                   members=members if hp.shared_optimizer else 1)
        if members == 1 or hp.shared_optimizer:
            groups = [self.parameters()]
        else:
            groups = [member.parameters() for member in self.model.members]
        optimizers = [build_optimizer(params, hp.optimizer, hp.lr, hp.epsilon) for params in groups]
        if decay_steps is None:
            return optimizers[0] if len(optimizers) == 1 else optimizers
        # Keras evaluates a schedule at every optimizer step; Lightning's default interval is the epoch
        schedulers = [{"scheduler": torch.optim.lr_scheduler.LambdaLR(
            optimizer, exponential_decay_lambda(hp.lr, decay_steps, hp.lr_decay_rate, staircase=True)),
            "interval": "step"} for optimizer in optimizers]
        if len(optimizers) == 1:
            return {"optimizer": optimizers[0], "lr_scheduler": schedulers[0]}
        return optimizers, schedulers

    @staticmethod
    def _check_model_name(checkpoint: dict, wanted: str) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("model_name")
        if saved is not None and saved != wanted:
            raise ValueError(
                f"this checkpoint holds a {saved!r} model, but a {wanted!r} model was asked for; "
                f"load it with model_name={saved!r} (parity train {saved} ...)"
            )

    @staticmethod
    def _check_hyperparameters(checkpoint: dict, wanted: dict, resuming: bool) -> None:
        """Hyperparameters that change the weights' layout (and, when resuming, the optimizer state's) must match
        the checkpoint's."""
        saved = checkpoint.get("hyper_parameters", {})
        flags = {"members": "--members"}
        if resuming:
            flags.update(optimizer="--set optimizer=...", shared_optimizer="--set shared_optimizer=...")
        for name, flag in flags.items():
            if name in saved and name in wanted and saved[name] != wanted[name]:
                raise ValueError(f"this checkpoint was trained with {name}={saved[name]!r}, but {name}="
                                 f"{wanted[name]!r} was asked for; load or resume it with {name}={saved[name]!r} "
                                 f"({flag}), or start a new run in another --out directory")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Trainer.fit(ckpt_path=...) and load_from_checkpoint call this before they load the weights
        self._check_model_name(checkpoint, self.hparams.model_name)
        resuming = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        self._check_hyperparameters(checkpoint, dict(self.hparams), resuming)
        self._convert_ensemble_layout(checkpoint)

    def _convert_ensemble_layout(self, checkpoint: dict) -> None:
        """Rewrite the weights of an ensemble checkpoint written in the other `ensemble_mode` into this one's
        layout. Resuming training across modes is refused: the optimizer state has the other layout."""
        state = checkpoint.get("state_dict", {})
        members = self.hparams.members
        if members == 1 or not state:
            return
        saved_vectorized = not any(key.startswith("model.members.") for key in state)
        if saved_vectorized == self.vectorized:
            return
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            saved = "vectorized" if saved_vectorized else "loop"
            raise ValueError(f"this checkpoint was trained with ensemble_mode={saved!r}; resume it in that mode "
                             f"(load_from_checkpoint converts its weights to the other mode)")
        weights = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
        # a module of the saved layout (copied from this one), loaded and converted
        if saved_vectorized:
            source = VectorizedEnsemble.from_ensemble(self.model)
            source.load_state_dict(weights)
            converted = source.to_ensemble().state_dict()
        else:
            source = self.model.to_ensemble()
            source.load_state_dict(weights)
            converted = VectorizedEnsemble.from_ensemble(source).state_dict()
        checkpoint["state_dict"] = {key: value for key, value in state.items() if not key.startswith("model.")}
        checkpoint["state_dict"].update({f"model.{key}": value for key, value in converted.items()})

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's, plus a clear error for a checkpoint of another model (it loads the weights before
        `on_load_checkpoint`, which would fail with a wall of state-dict mismatches instead)."""
        if "model_name" in kwargs or "members" in kwargs:
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
            if "model_name" in kwargs:
                cls._check_model_name(checkpoint, kwargs["model_name"])
            cls._check_hyperparameters(checkpoint, kwargs, resuming=False)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
