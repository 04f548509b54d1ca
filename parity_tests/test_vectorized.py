"""The vectorized ensemble (all members in one pass, one optimizer step with a member axis) computes what tutorial
001's member-by-member loop computes: the same logits, the same parameters and BatchNorm statistics after several
steps of the shared-counter Adam under a staircase schedule, the same evaluation metrics, and checkpoints that load
in either mode."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torch_impl.lightning_module import COMBINE, ClassifierModule, combine_members, member_agreement
from torch_impl.models import Ensemble, VectorizedEnsemble, build_member
from torch_impl.optim import ExponentialDecay, KerasAdam, KerasRMSprop, exponential_decay_lambda

CASES = [("cnn", 3), ("bn_cnn", 5)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These batches are tiny: with two intra-op threads on a busy 2-core machine every small op waits for a
    descheduled thread (the looped bn_cnn fit below ran 20x slower). One thread; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _no_dropout(module: nn.Module) -> nn.Module:
    """Dropout off: the looped and vectorized members draw their masks in different orders."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return module


def _state_diff(a: nn.Module, b: nn.Module) -> tuple[str, float]:
    """The tensor (parameter or buffer) of two ordinary ensembles that differs most, and by how much."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    diffs = {k: (sa[k].double() - sb[k].double()).abs().max().item() for k in sa}
    worst = max(diffs, key=diffs.get)
    return worst, diffs[worst]


def _loader(n: int = 40, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=batch)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


# ------------------------------------------------------------------------------------------ model
@pytest.fixture(scope="module")
def ensembles() -> dict[str, Ensemble]:
    """One seeded looped ensemble per case, with non-trivial BatchNorm statistics (tests take deep copies)."""
    built = {}
    for name, members in CASES:
        torch.manual_seed(0)
        ensemble = Ensemble(lambda name=name: build_member(name), members)
        for member in ensemble.members:  # a few batches so that the running statistics are not the init's
            member.train()(torch.rand(8, 1, 28, 28))
        built[name] = ensemble
    return built


@pytest.mark.parametrize(("name", "members"), CASES)
def test_fresh_init_and_round_trip(name, members, ensembles):
    """Same seed, same initial weights as the looped Ensemble; Ensemble -> vectorized -> Ensemble is exact."""
    torch.manual_seed(0)
    vectorized = VectorizedEnsemble(name, members)
    torch.manual_seed(0)
    looped = Ensemble(lambda: build_member(name), members)
    worst, diff = _state_diff(looped, vectorized.to_ensemble())
    assert diff == 0.0, f"{name} x{members}: fresh init differs at {worst} by {diff:.3g}"

    original = ensembles[name]
    back = VectorizedEnsemble.from_ensemble(original).to_ensemble()
    worst, diff = _state_diff(original, back)
    assert diff == 0.0, f"{name} x{members}: round trip changes {worst} by {diff:.3g}"
    worst, diff = _state_diff(back.members[0], back.members[1])
    assert diff > 0.01, "the members must differ (else a mixed-up member order would go unnoticed)"


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("name", "members"), CASES)
def test_forward_equals_members(name, members, mode, ensembles):
    """(M, B, classes) logits equal member-by-member ones (float32, 1e-5); in training mode the BatchNorm batch
    statistics and the running statistics they update are per member too."""
    looped = _no_dropout(copy.deepcopy(ensembles[name]))
    vectorized = _no_dropout(VectorizedEnsemble.from_ensemble(looped))
    looped.train(mode == "train")
    vectorized.train(mode == "train")
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        want = torch.stack(looped.member_logits(x))
        got = vectorized(x)
    assert got.shape == (members, 16, 10)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-5, f"{name} x{members} ({mode}): logits differ by {diff:.3g}"
    worst, diff = _state_diff(looped, vectorized.to_ensemble())
    assert diff <= 1e-6, f"{name} x{members} ({mode}): {worst} differs by {diff:.3g} after the forward pass"


def test_unsupported_member_and_mode_are_refused():
    with pytest.raises(ValueError, match="supports members of cnn, bn_cnn, not 'lenet_a'"):
        ClassifierModule("lenet_a", members=3, ensemble_mode="vectorized")
    with pytest.raises(ValueError, match="unknown ensemble_mode 'vmap'"):
        ClassifierModule("cnn", members=3, ensemble_mode="vmap")
    with pytest.raises(ValueError, match="no vectorized ensemble of 'lenet_a' members"):
        VectorizedEnsemble("lenet_a", 3)
    with pytest.raises(ValueError, match="no vectorized ensemble of LeNet members"):
        VectorizedEnsemble.from_ensemble(Ensemble(lambda: build_member("lenet_a"), 2))
    with pytest.raises(ValueError, match="does not split into 3 members"):
        p = torch.zeros(4, requires_grad=True)
        p.grad = torch.ones(4)
        KerasAdam([p], members=3).step()


# ------------------------------------------------------------------------------------------ optimizer
def _elementwise_grad(p: torch.Tensor) -> torch.Tensor:
    """A gradient that depends on each element alone, so a member's slice gets the same one in both layouts."""
    return torch.sin(3.0 * p) + 0.5 * (p - 0.3)


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "independent"])
def test_member_axis_equals_looped_optimizers(optimizer, shared):
    """One step over stacked members (`members=M`) = M applications of one shared optimizer, each with its own
    step t = M*s + k + 1 and scheduled rate at M*s + k (shared); = M optimizers of their own (independent)."""
    members, steps, lr0 = 3, 6, 0.05
    opt_class = KerasAdam if optimizer == "adam" else KerasRMSprop
    torch.manual_seed(0)
    # a fused-channel layout (M*4, 2) and a leading-member-axis layout (M, 3), float64
    stacked = [torch.randn(members * 4, 2, dtype=torch.float64), torch.randn(members, 3, dtype=torch.float64)]
    parts = [[stacked[0][4 * k:4 * k + 4].clone(), stacked[1][k].clone()] for k in range(members)]
    stacked = [p.requires_grad_() for p in stacked]
    parts = [[p.requires_grad_() for p in member] for member in parts]

    schedule = ExponentialDecay(lr0, 2, 0.5, staircase=True)  # decays within a batch's member steps
    ours = opt_class(stacked, lr=schedule, members=members if shared else 1)
    if shared:
        looped = [opt_class([p for member in parts for p in member], lr=lr0)] * members
    else:
        looped = [opt_class(member, lr=lr0) for member in parts]
    schedulers = {id(o): torch.optim.lr_scheduler.LambdaLR(o, exponential_decay_lambda(lr0, 2, 0.5, True))
                  for o in looped}
    for _ in range(steps):
        for p in stacked:
            p.grad = _elementwise_grad(p.detach())
        ours.step()
        for member, opt in zip(parts, looped):
            opt.zero_grad(set_to_none=True)  # the other members' tensors get no update from this apply
            for p in member:
                p.grad = _elementwise_grad(p.detach())
            opt.step()
            schedulers[id(opt)].step()
    for k, member in enumerate(parts):
        got = [stacked[0][4 * k:4 * k + 4], stacked[1][k]]
        for g, w in zip(got, member):
            # float64; the looped rate goes through LambdaLR's lr0 * (schedule / lr0): a last-bit difference at most
            torch.testing.assert_close(g, w, rtol=1e-13, atol=0, msg=f"{optimizer}, member {k}")
    assert ours.iterations == (members * steps if shared else steps)
    assert all(opt.iterations == ours.iterations for opt in looped)
    assert ours.param_groups[0]["lr"] == pytest.approx(looped[0].param_groups[0]["lr"], rel=1e-12)

    if optimizer == "adam":  # the counter matters: the other semantics lands elsewhere
        torch.manual_seed(0)  # the same start, the other counter semantics
        other = [torch.randn(members * 4, 2, dtype=torch.float64), torch.randn(members, 3, dtype=torch.float64)]
        other = [p.requires_grad_() for p in other]
        wrong = KerasAdam(other, lr=schedule, members=1 if shared else members)
        for _ in range(steps):
            for p in other:
                p.grad = _elementwise_grad(p.detach())
            wrong.step()
        assert (other[0] - stacked[0]).abs().max() > 1e-4, "shared and independent counters must differ"


# ------------------------------------------------------------------------------------------ training
def _fit(mode: str, name: str, members: int, precision: str, shared: bool = True) -> ClassifierModule:
    torch.manual_seed(0)
    # 5 batches; decay_steps = round(5 * 0.4) = 2 applications, so members of one batch see different rates
    module = ClassifierModule(name, members=members, ensemble_mode=mode, shared_optimizer=shared,
                              lr_decay_rate=0.7, lr_decay_epochs=0.4)
    _no_dropout(module)
    _trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=0, precision=precision).fit(
        module, train_dataloaders=_loader())
    return module


@pytest.mark.parametrize(("name", "members", "precision", "tolerance"), [
    ("cnn", 3, "32-true", 1e-5),
    # bn_cnn in float64: the conv / dense biases in front of BatchNorm get gradients at float32 rounding level
    # (BatchNorm removes the shift they make), which Adam turns into near-lr-sized steps of either sign, 2e-4 apart
    # after 5 steps between any two kernels' summation orders (see test_train_step_parity). In float64 that noise
    # is 1e-12, so the tolerance can be far tighter than 1e-5.
    ("bn_cnn", 5, "64-true", 1e-9),
])
def test_training_equals_loop(name, members, precision, tolerance):
    """5 Lightning steps, shared Adam, staircase decay: vectorized == looped (parameters and BN statistics)."""
    looped = _fit("loop", name, members, precision)
    vectorized = _fit("vectorized", name, members, precision)
    assert vectorized.automatic_optimization and not looped.automatic_optimization
    lo, vo = looped.optimizers().optimizer, vectorized.optimizers().optimizer
    assert lo.iterations == vo.iterations == 5 * members
    assert vo.param_groups[0]["lr"] == pytest.approx(lo.param_groups[0]["lr"], rel=1e-6)
    worst, diff = _state_diff(looped.ensemble(), vectorized.ensemble())
    assert diff <= tolerance, f"{name} x{members}: {worst} differs by {diff:.3g} after 5 steps"
    torch.manual_seed(0)
    initial = Ensemble(lambda: build_member(name), members)
    assert _state_diff(looped.ensemble(), initial)[1] > 1e-4, "5 steps must move the weights"


def test_independent_optimizers_equal_loop():
    """shared_optimizer=False (each member its own counter and schedule) agrees across modes, and differs from the
    tutorial's shared counter."""
    looped = _fit("loop", "cnn", 2, "32-true", shared=False)
    vectorized = _fit("vectorized", "cnn", 2, "32-true", shared=False)
    assert [o.optimizer.iterations for o in looped.optimizers()] == [5, 5]
    assert vectorized.optimizers().optimizer.iterations == 5
    worst, diff = _state_diff(looped.ensemble(), vectorized.ensemble())
    assert diff <= 1e-5, f"independent optimizers: {worst} differs by {diff:.3g}"
    shared = _fit("vectorized", "cnn", 2, "32-true")
    assert _state_diff(shared.ensemble(), vectorized.ensemble())[1] > 1e-4


# ------------------------------------------------------------------------------------------ Lightning, metrics
def test_member_agreement_counts_unanimous_images():
    logits = torch.zeros(3, 4, 10)
    logits[:, 0, 1] = 1  # all three say 1
    logits[:2, 1, 2], logits[2, 1, 3] = 1, 1  # 2, 2, 3
    logits[:, 2, 5] = 1  # all say 5
    logits[0, 3, 0], logits[1, 3, 1], logits[2, 3, 2] = 1, 1, 1
    assert member_agreement(logits).tolist() == [True, False, True, False]


def test_lightning_fit_test_and_checkpoints_across_modes(tmp_path):
    """fast_dev_run fit + test in vectorized mode; its checkpoint loads in both modes with the same predictions
    and metrics (member accuracies, member_agreement); resuming it in loop mode is refused."""
    loader = _loader(n=32, batch=16)
    vectorized = ClassifierModule("cnn_ensemble3", ensemble_mode="vectorized", train_acc_after_step=True)
    trainer = _trainer(fast_dev_run=2)
    trainer.fit(vectorized, train_dataloaders=loader, val_dataloaders=loader)
    assert trainer.global_step == 2 and vectorized.optimizers().optimizer.iterations == 6
    row = vectorized.epoch_metrics()
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= row.keys()
    path = tmp_path / "vectorized.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["hyper_parameters"]["model_name"] == "cnn_ensemble3"

    restored = ClassifierModule.load_from_checkpoint(path)
    looped = ClassifierModule.load_from_checkpoint(path, ensemble_mode="loop")
    assert restored.vectorized and not looped.vectorized and len(looped.members) == 3
    x = next(iter(loader))[0]
    for module in (vectorized, restored, looped):
        module.eval()
    with torch.no_grad():
        want = vectorized.member_logits(x)
        assert torch.equal(restored.member_logits(x), want)
        assert (looped.member_logits(x) - want).abs().max() <= 1e-5
        for combine in COMBINE:
            vectorized.hparams.combine = looped.hparams.combine = combine
            assert (looped(x) - vectorized(x)).abs().max() <= 1e-5, combine

    rows = []
    for module in (vectorized, looped):
        module.hparams.combine = "logits"
        module.reset_epoch_metrics()
        _trainer().test(module, dataloaders=loader, verbose=False)
        rows.append(module.epoch_metrics())
    expected = {"test_loss", "test_acc", "member0_test_acc", "member1_test_acc", "member2_test_acc",
                "member_agreement"}
    assert expected <= rows[0].keys() and expected <= rows[1].keys()
    for key in expected:
        assert rows[0][key] == pytest.approx(rows[1][key], abs=1e-6), key
    with torch.no_grad():
        direct = torch.cat([member_agreement(vectorized.member_logits(xb)) for xb, _ in loader]).float().mean()
    assert rows[0]["member_agreement"] == pytest.approx(float(direct))
    # every combine rule's ensemble accuracy is reported, whichever one test_acc uses
    for rule in COMBINE:
        with torch.no_grad():
            hits = torch.cat([(combine_members(vectorized.member_logits(xb), rule).argmax(-1) == yb)
                              for xb, yb in loader]).float().mean()
        assert rows[0][f"members_{rule}_test_acc"] == pytest.approx(float(hits)), rule
    assert rows[0]["members_logits_test_acc"] == rows[0]["test_acc"]

    # loop -> vectorized through a checkpoint, too
    loop_path = tmp_path / "loop.ckpt"
    torch.save({"state_dict": looped.state_dict(), "hyper_parameters": dict(looped.hparams),
                "pytorch-lightning_version": L.__version__}, loop_path)
    again = ClassifierModule.load_from_checkpoint(loop_path, ensemble_mode="vectorized").eval()
    with torch.no_grad():
        assert (again.member_logits(x) - want).abs().max() <= 1e-5

    with pytest.raises(ValueError, match="trained with ensemble_mode='vectorized'; resume it in that mode"):
        _trainer(fast_dev_run=1).fit(ClassifierModule("cnn_ensemble3"), train_dataloaders=loader, ckpt_path=path)


def test_parity_train_and_lightning_cli_select_vectorized(tmp_path):
    """The mode is a run option, not a code change: `parity train --ensemble-mode vectorized` trains and
    checkpoints a vectorized ensemble, and the LightningCLI config takes `--model.ensemble_mode=vectorized`."""
    from pathlib import Path

    from parity.cli import main
    from torch_impl.cli import main as lightning_cli

    status = main(["train", "cnn_ensemble3", "--framework", "torch", "--ensemble-mode", "vectorized", "--epochs",
                   "1", "--limit-train", "200", "--out", str(tmp_path), "--no-progress"])
    assert status == 0
    restored = ClassifierModule.load_from_checkpoint(
        tmp_path / "cnn_ensemble3" / "torch" / "seed0" / "checkpoints" / "last.ckpt")
    assert restored.hparams.ensemble_mode == "vectorized" and isinstance(restored.model, VectorizedEnsemble)

    config = Path(__file__).resolve().parent.parent / "configs" / "tut001_ensemble.yaml"
    cli = lightning_cli(["fit", "--config", str(config), "--model.ensemble_mode=vectorized",
                         "--trainer.fast_dev_run=true", "--data.limit_train=200",
                         f"--trainer.default_root_dir={tmp_path / 'cli'}", "--trainer.enable_progress_bar=false"])
    assert cli.model.vectorized and isinstance(cli.model.model, VectorizedEnsemble)
    assert cli.trainer.global_step == 1


def test_parity_train_prints_every_combine_rule_for_an_ensemble(tmp_path, capsys):
    """`parity train` on an ensemble reports the member accuracies, their agreement and the ensemble accuracy of
    each combine rule (sum of logits as the tutorial, mean probability, vote), not only the configured one."""
    from parity.cli import main

    status = main(["train", "cnn_ensemble3", "--framework", "torch", "--members", "2", "--epochs", "1",
                   "--limit-train", "64", "--out", str(tmp_path), "--no-progress"])
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines()
                   if line.startswith("member") and ": " in line)
    assert status == 0
    wanted = {"member0_test_acc", "member1_test_acc", "member_agreement", "members_logits_test_acc",
              "members_probs_test_acc", "members_vote_test_acc"}
    assert wanted <= printed.keys(), printed
    assert all(0.0 <= float(value) <= 1.0 for value in printed.values())
    # TensorBoard gets the same numbers under members/, at step = epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "cnn_ensemble3" / "torch" / "seed0" / "tensorboard"))
    events.Reload()
    for key in wanted:
        (scalar,) = events.Scalars(f"members/{key}")
        assert scalar.step == 1 and scalar.value == pytest.approx(float(printed[key]), abs=1e-4), key


def test_combine_rules_against_hand_computed_scores():
    """The three ensemble rules on logits built so that they disagree, checked against scores computed by hand.

    Image 0: one confident member says class 0, two mild ones class 1: the logit sum and the probability mean
    follow the confident member (0), the vote follows the majority (1). Image 1: the same with the confident member's
    logit so large that its probability saturates: the sum still says 0, the probability mean and the vote say 1.
    Image 2: three members, three different classes: the tied vote goes to the highest mean probability (2).
    """
    import math

    member_logits = torch.tensor([
        [[4.0, 0.0, 0.0], [10.0, 0.0, 0.0], [2.0, 0.0, 0.0]],
        [[0.0, 0.5, 0.0], [0.0, 3.0, 0.0], [0.0, 1.0, 0.0]],
        [[0.0, 0.5, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]],
    ])  # (members, images, classes)

    def softmax(row):
        exps = [math.exp(v) for v in row]
        return [e / sum(exps) for e in exps]

    rows = member_logits.tolist()
    expected_sum = [[sum(rows[m][i][c] for m in range(3)) for c in range(3)] for i in range(3)]
    expected_probs = [[sum(softmax(rows[m][i])[c] for m in range(3)) / 3 for c in range(3)] for i in range(3)]
    assert expected_sum[1] == [10.0, 6.0, 0.0] and expected_probs[1][1] > expected_probs[1][0]  # the example holds

    assert torch.allclose(combine_members(member_logits, "logits"), torch.tensor(expected_sum))
    assert torch.allclose(combine_members(member_logits, "probs"), torch.tensor(expected_probs), atol=1e-6)
    votes = combine_members(list(member_logits), "vote")  # a list of (B, classes) works as well as a stack
    assert torch.equal(votes.round(), torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [1.0, 1.0, 1.0]]))

    assert combine_members(member_logits, "logits").argmax(-1).tolist() == [0, 0, 2]
    assert combine_members(member_logits, "probs").argmax(-1).tolist() == [0, 1, 2]
    assert votes.argmax(-1).tolist() == [1, 1, 2]
    assert member_agreement(member_logits).tolist() == [False, False, False]
    assert member_agreement(member_logits[1:2]).tolist() == [True, True, True]
    with pytest.raises(ValueError, match="choose one of: logits, probs, vote"):
        combine_members(member_logits, "median")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer_class", [KerasAdam, KerasRMSprop])
def test_member_axis_optimizer_on_cuda_takes_the_cpu_steps(optimizer_class):
    """On a GPU the member factors reach the device by an asynchronous copy from pinned memory (no host-device
    synchronization per step); the steps are still each member's own: the CPU's, to float rounding, under a
    staircase schedule that changes the factors between steps."""
    torch.manual_seed(0)
    params = {device: torch.randn(3 * 4, 5, dtype=torch.float64, device=device) for device in ("cpu", "cuda")}
    params["cuda"].copy_(params["cpu"])
    schedule = ExponentialDecay(1e-2, decay_steps=2, decay_rate=0.5, staircase=True)
    optimizers = {device: optimizer_class([nn.Parameter(p)], lr=schedule, members=3) for device, p in params.items()}
    for step in range(4):
        grad = torch.randn(3 * 4, 5, dtype=torch.float64)
        for device, optimizer in optimizers.items():
            parameter = optimizer.param_groups[0]["params"][0]
            parameter.grad = grad.to(device)
            optimizer.step()
    got = optimizers["cuda"].param_groups[0]["params"][0].detach().cpu()
    want = optimizers["cpu"].param_groups[0]["params"][0].detach()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
