"""Tutorial 001's ensembles with all members in one forward pass (no Python loop over members).

The members' layers are fused: convolution `i` of every member becomes one convolution whose output channels are
the members' blocks in order (member k owns channels k*C..(k+1)*C-1), with `groups=M` after the first layer so a
member only sees its own channels; BatchNorm and max pooling act per channel, hence per member, and keep each
member's running statistics exactly; the Dense layers are batched matmuls with weights (M, out, in). Every tensor
is member-major along dim 0, which is what `KerasAdam(members=M)` expects to reproduce the tutorial's shared
optimizer. Parameter names are the member's (`conv1.weight`, `dense4.bn.running_var`, ...), so converting to and
from an ordinary `Ensemble` is a concatenation / stack per tensor (`from_ensemble`, `to_ensemble`).
"""

from __future__ import annotations

import torch
from torch import nn

from torch_impl.layers import BatchNorm1d, BatchNorm2d, Dropout, MaxPool2d
from torch_impl.models.bn_cnn import BNCNN
from torch_impl.models.cnn import CNN
from torch_impl.models.ensemble import Ensemble

# member catalog name -> member class; both are [conv 3x3 'same' (+BN) relu, max pool 'same'] x (32, 64, 128)
# -> Flatten (NCHW) -> Dense 256 (+BN) relu -> Dropout -> Dense classes
MEMBER_CLASSES: dict[str, type[nn.Module]] = {"cnn": CNN, "bn_cnn": BNCNN}
_FILTERS = (32, 64, 128)


class StackedLinear(nn.Module):
    """M independent `nn.Linear(in, out)`: weight (M, out, in), bias (M, out); (M, B, in) -> (M, B, out)."""

    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def extra_repr(self) -> str:
        return f"members={self.weight.shape[0]}, in_features={self.in_features}, out_features={self.out_features}"


class _ConvBNRelu(nn.Module):
    """bn_cnn's ConvBNRelu for all members: fused conv -> per-channel Keras BatchNorm; as in `BNCNN`, the block's
    ReLU runs after the max pooling that follows it (VectorizedEnsemble.forward)."""

    def __init__(self, conv: nn.Conv2d, channels: int) -> None:
        super().__init__()
        self.conv, self.bn = conv, BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class _DenseBNRelu(nn.Module):
    """bn_cnn's DenseBNRelu for all members: the Keras BatchNorm of (M, B, units) activations is per member and
    unit, i.e. a plain per-channel `BatchNorm1d` of the (B, M*units) layout (two small copies; a plain BatchNorm
    class so that `torch_impl.distributed` can swap in its synchronized twin)."""

    def __init__(self, members: int, in_features: int, units: int) -> None:
        super().__init__()
        self.dense, self.bn = StackedLinear(members, in_features, units), BatchNorm1d(members * units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dense(x)
        members, batch, units = x.shape
        x = self.bn(x.transpose(0, 1).reshape(batch, members * units))
        return torch.relu(x).view(batch, members, units).transpose(0, 1)


class VectorizedEnsemble(nn.Module):
    """`members` models of `member_name` ("cnn" or "bn_cnn") in one pass: x (B, 1, 28, 28), shared by all members
    -> per-member logits (M, B, classes). The sum over dim 0 is tutorial 001's ensemble prediction.

    A fresh instance draws each member's initial weights exactly as `Ensemble(member_class, members)` does (same
    random draws in the same order), so both start from the same weights under the same seed.
    """

    def __init__(self, member_name: str, members: int, num_classes: int = 10, dropout: float = 0.4) -> None:
        super().__init__()
        self._setup(member_name, members, num_classes, dropout)
        self.load_ensemble(Ensemble(lambda: MEMBER_CLASSES[member_name](num_classes, dropout), members))

    @classmethod
    def _uninitialized(cls, member_name: str, members: int, num_classes: int, dropout: float) -> VectorizedEnsemble:
        """The layers without the members' initialization (for weights about to be loaded)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._setup(member_name, members, num_classes, dropout)
        return module

    def _setup(self, member_name: str, members: int, num_classes: int, dropout: float) -> None:
        if member_name not in MEMBER_CLASSES:
            raise ValueError(f"no vectorized ensemble of {member_name!r} members; supported members: "
                             f"{', '.join(MEMBER_CLASSES)} (use ensemble_mode='loop' for other models)")
        if members < 1:
            raise ValueError(f"an ensemble needs at least one member, got {members}")
        self.member_name, self.num_members = member_name, members
        self.num_classes, self.dropout = num_classes, dropout
        with torch.random.fork_rng(devices=[]):  # the layers' own default init must not consume random draws
            self._build()

    def _build(self) -> None:
        m, batchnorm = self.num_members, self.member_name == "bn_cnn"
        in_channels = 1
        for i, filters in enumerate(_FILTERS, start=1):
            # layer 1 reads the shared input (groups=1); later layers read only their member's channel block
            conv = nn.Conv2d(in_channels * (m if i > 1 else 1), filters * m, 3, padding=1, groups=m if i > 1 else 1)
            self.add_module(f"conv{i}", _ConvBNRelu(conv, filters * m) if batchnorm else conv)
            self.add_module(f"pool{i}", MaxPool2d(2, padding="same"))
            in_channels = filters
        flat = 4 * 4 * _FILTERS[-1]
        self.dense4 = _DenseBNRelu(m, flat, 256) if batchnorm else StackedLinear(m, flat, 256)
        self.drop4 = Dropout(self.dropout)  # per element: the members draw independent masks
        self.dense5 = StackedLinear(m, 256, self.num_classes)
        self._dense_relu = not batchnorm  # cnn applies its ReLU after the dense module; bn_cnn's block includes it

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (M, B, classes) logits
        # the members' ReLU after the max pooling, as CNN and BNCNN do (same values and gradients, 4x fewer elements)
        x = torch.relu(self.pool1(self.conv1(x)))  # (B, M*32, 14, 14)
        x = torch.relu(self.pool2(self.conv2(x)))  # (B, M*64, 7, 7)
        x = torch.relu(self.pool3(self.conv3(x)))  # (B, M*128, 4, 4)
        # member k's block flattened in its own nn.Flatten (NCHW) order, then members first: (M, B, 2048)
        x = x.reshape(x.shape[0], self.num_members, -1).transpose(0, 1)
        x = self.dense4(x)
        x = self.drop4(torch.relu(x) if self._dense_relu else x)
        return self.dense5(x)

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_ensemble(cls, ensemble: Ensemble) -> VectorizedEnsemble:
        """A vectorized copy of an ordinary `Ensemble` (weights and BatchNorm statistics), on its device/dtype."""
        first = ensemble.members[0]
        name = next((n for n, c in MEMBER_CLASSES.items() if type(first) is c), None)
        if name is None:
            raise ValueError(f"no vectorized ensemble of {type(first).__name__} members; supported members: "
                             f"{', '.join(c.__name__ for c in MEMBER_CLASSES.values())}")
        vectorized = cls._uninitialized(name, len(ensemble.members), first.dense5.out_features, first.drop4.p)
        reference = next(first.parameters())
        vectorized.to(device=reference.device, dtype=reference.dtype)
        vectorized.load_ensemble(ensemble)
        return vectorized.train(ensemble.training)

    @torch.no_grad()
    def load_ensemble(self, ensemble: Ensemble) -> None:
        """Copy an ordinary `Ensemble`'s members (same member class and sizes) into the stacked tensors."""
        members = list(ensemble.members)
        if len(members) != self.num_members:
            raise ValueError(f"this vectorized ensemble has {self.num_members} members, the ensemble {len(members)}")
        states = [member.state_dict() for member in members]
        own = self.state_dict()
        if set(states[0]) != set(own):
            raise ValueError(f"{type(members[0]).__name__} members do not match a vectorized {self.member_name!r} "
                             f"ensemble: tensors {sorted(set(states[0]) ^ set(own))} differ")
        for name, target in own.items():
            parts = [state[name] for state in states]
            if target.dim() == 0:  # num_batches_tracked: one counter for the fused layer
                stacked = parts[0]
            elif target.dim() == parts[0].dim():  # fused channels: member blocks one after the other
                stacked = torch.cat(parts)
            else:  # a leading member axis
                stacked = torch.stack(parts)
            if stacked.shape != target.shape:
                raise ValueError(f"{name}: members give shape {tuple(stacked.shape)}, expected {tuple(target.shape)}")
            target.copy_(stacked)

    @torch.no_grad()
    def member_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Each member's state_dict as the ordinary member module names it (copies)."""
        states: list[dict[str, torch.Tensor]] = [{} for _ in range(self.num_members)]
        for name, tensor in self.state_dict().items():
            if tensor.dim() == 0:
                parts = [tensor] * self.num_members
            elif isinstance(self.get_submodule(name.rsplit(".", 1)[0]), StackedLinear):  # a leading member axis
                parts = list(tensor.unbind(0))
            else:  # fused channels
                parts = list(tensor.chunk(self.num_members, dim=0))
            for state, part in zip(states, parts):
                state[name] = part.clone()
        return states

    def to_ensemble(self) -> Ensemble:
        """The same members as an ordinary `Ensemble` (a copy, on this module's device and dtype): for
        checkpoints of the looped layout, evaluation member by member and `parity.interchange` to TF."""
        with torch.device("meta"):  # shells without storage or initialization: every tensor is loaded below
            ensemble = Ensemble(lambda: MEMBER_CLASSES[self.member_name](self.num_classes, self.drop4.p),
                                self.num_members)
        reference = next(self.parameters())
        ensemble.to_empty(device=reference.device).to(dtype=reference.dtype)
        for member, state in zip(ensemble.members, self.member_state_dicts()):
            member.load_state_dict(state)
        return ensemble.train(self.training)

    def extra_repr(self) -> str:
        return f"member={self.member_name!r}, members={self.num_members}"


__all__ = ["MEMBER_CLASSES", "StackedLinear", "VectorizedEnsemble"]
