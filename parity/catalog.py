"""The model catalog: every architecture of the four tutorials, with the numbers the tutorials printed.

Framework-neutral (no TensorFlow, no torch): both `tf_ref` and `torch_impl` build models by these names and
the tests check each built model against the parameter counts and per-layer output shapes stored here.

Shapes are Keras's: without the batch dimension, in (H, W, C) order; a flat tensor is `(features,)`.
Layer names are the ones both frameworks use (Keras `name=` and the torch attribute name), so weights map one
to one.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerSpec:
    name: str
    output_shape: tuple[int, ...]
    params: int


@dataclass(frozen=True)
class ModelSpec:
    name: str
    tutorial: str
    description: str
    input_shape: tuple[int, int, int]
    trainable_params: int
    non_trainable_params: int
    layers: tuple[LayerSpec, ...]
    recipe: str
    output: str = "logits"  # "logits" or "softmax": what the tutorial's model returns
    reported_accuracy: float | None = None  # test accuracy the tutorial printed, as a fraction
    notes: str = ""
    members: int = 1  # >1: an ensemble of `member` models whose logits are summed
    member: str | None = None

    @property
    def total_params(self) -> int:
        return self.trainable_params + self.non_trainable_params


def _layers(*rows: tuple[str, tuple[int, ...], int]) -> tuple[LayerSpec, ...]:
    return tuple(LayerSpec(name, shape, params) for name, shape, params in rows)


_CNN_LAYERS = _layers(
    ("conv1", (28, 28, 32), 320),
    ("pool1", (14, 14, 32), 0),
    ("conv2", (14, 14, 64), 18_496),
    ("pool2", (7, 7, 64), 0),
    ("conv3", (7, 7, 128), 73_856),
    ("pool3", (4, 4, 128), 0),  # 'same' max pooling: 7 -> 4
    ("pool3_flat", (2048,), 0),
    ("dense4", (256,), 524_544),
    ("drop4", (256,), 0),
    ("dense5", (10,), 2_570),
)

_LENET_A_LAYERS = (
    ("conv1", (14, 14, 8), 208),
    ("pool1", (7, 7, 8), 0),
    ("conv2", (7, 7, 16), 1_168),
    ("pool2", (3, 3, 16), 0),
    ("conv3", (3, 3, 64), 4_160),  # 'same' with an even kernel (2): TF pads bottom/right only
    ("conv4", (1, 1, 128), 73_856),
    ("conv5", (1, 1, 32), 4_128),
    ("flatten", (32,), 0),
    ("dense", (10,), 330),
)


def _insert_after(rows, after: str, new: tuple[str, tuple[int, ...], int]):
    out = []
    for row in rows:
        out.append(row)
        if row[0] == after:
            out.append(new)
    return tuple(out)


_LENET_B_LAYERS = _insert_after(
    _insert_after(_LENET_A_LAYERS, "conv4", ("drop1", (1, 1, 128), 0)), "conv5", ("drop2", (1, 1, 32), 0)
)
_LENET_C_LAYERS = _insert_after(
    _insert_after(_LENET_A_LAYERS, "pool1", ("lrn1", (7, 7, 8), 0)), "pool2", ("lrn2", (3, 3, 16), 0)
)

_CATALOG: dict[str, ModelSpec] = {}


def _register(spec: ModelSpec) -> None:
    layer_total = sum(layer.params for layer in spec.layers)
    if layer_total != spec.total_params:  # a typo in the table below must not go unnoticed
        raise RuntimeError(f"{spec.name}: layer params sum to {layer_total}, totals say {spec.total_params}")
    _CATALOG[spec.name] = spec


_register(
    ModelSpec(
        name="cnn",
        tutorial="001",
        description="[Conv3x3 same relu, MaxPool2 same] x (32, 64, 128) -> Dense 256 -> Dropout 0.4 -> Dense 10",
        input_shape=(28, 28, 1),
        trainable_params=619_786,
        non_trainable_params=0,
        layers=_CNN_LAYERS,
        recipe="tut001_cnn",
        reported_accuracy=0.9931,
    )
)
_register(
    ModelSpec(
        name="cnn_ensemble3",
        tutorial="001",
        description="3 x cnn (subclassed), prediction = sum of the members' logits",
        input_shape=(28, 28, 1),
        trainable_params=3 * 619_786,
        non_trainable_params=0,
        layers=_layers(*((f"member{i}", (10,), 619_786) for i in range(3))),
        recipe="tut001_ensemble",
        reported_accuracy=0.9949,
        members=3,
        member="cnn",
    )
)
_register(
    ModelSpec(
        name="bn_cnn",
        tutorial="001",
        description="ConvBNRelu + MaxPool2 same x (32, 64, 128) -> DenseBNRelu 256 -> Dropout 0.4 -> Dense 10",
        input_shape=(28, 28, 1),
        trainable_params=620_746,
        non_trainable_params=960,
        layers=_layers(
            ("conv1", (28, 28, 32), 448),
            ("pool1", (14, 14, 32), 0),
            ("conv2", (14, 14, 64), 18_752),
            ("pool2", (7, 7, 64), 0),
            ("conv3", (7, 7, 128), 74_368),
            ("pool3", (4, 4, 128), 0),
            ("pool3_flat", (2048,), 0),
            ("dense4", (256,), 525_568),
            ("drop4", (256,), 0),
            ("dense5", (10,), 2_570),
        ),
        recipe="tut001_best",
        reported_accuracy=0.9967,
        notes="reported accuracy is the 5-member ensemble's (99.71% at its best epoch)",
    )
)
_register(
    ModelSpec(
        name="residual_block",
        tutorial="001",
        description="28x28x256 -> Conv1x1 64 relu -> Conv3x3 64 relu -> Conv1x1 256 -> add input -> relu",
        input_shape=(28, 28, 256),
        trainable_params=70_016,
        non_trainable_params=0,
        layers=_layers(
            ("conv1", (28, 28, 64), 16_448),
            ("conv2", (28, 28, 64), 36_928),
            ("conv3", (28, 28, 256), 16_640),
            ("add3", (28, 28, 256), 0),
            ("relu3", (28, 28, 256), 0),
        ),
        recipe="",
        output="features",
        notes="a building block shown in the tutorial, not trained",
    )
)
_register(
    ModelSpec(
        name="convpool",
        tutorial="002",
        description="Conv64 x2 -> AvgPool2 -> Dropout .25 -> Conv32 x2 -> AvgPool2 -> Dropout .25 -> Dense 256 -> "
        "Dropout .5 -> Dense 10",
        input_shape=(28, 28, 1),
        trainable_params=469_514,
        non_trainable_params=0,
        layers=_layers(
            ("conv1", (28, 28, 64), 640),
            ("conv2", (28, 28, 64), 36_928),
            ("pool1", (14, 14, 64), 0),
            ("drop1", (14, 14, 64), 0),
            ("conv3", (14, 14, 32), 18_464),
            ("conv4", (14, 14, 32), 9_248),
            ("pool2", (7, 7, 32), 0),
            ("drop2", (7, 7, 32), 0),
            ("flatten", (1568,), 0),
            ("dense1", (256,), 401_664),
            ("drop3", (256,), 0),
            ("logits", (10,), 2_570),
        ),
        recipe="tut002",
        reported_accuracy=0.9932,
        notes="the TF1 tf.layers model returns logits (its loss is sparse softmax cross-entropy on logits); "
        "the tutorial's printed Keras summary says MaxPooling but its code uses AveragePooling: the code is the model",
    )
)
_register(
    ModelSpec(
        name="lenet_a",
        tutorial="003",
        description="LeNet-like: Conv8 k5 s2 -> AvgPool2 -> Conv16 k3 -> AvgPool3 s2 -> Conv64 k2 -> Conv128 k3 valid "
        "-> Conv32 k1 -> Dense 10 softmax",
        input_shape=(28, 28, 1),
        trainable_params=83_850,
        non_trainable_params=0,
        layers=_layers(*_LENET_A_LAYERS),
        recipe="tut003",
        output="softmax",
        reported_accuracy=0.9882,
    )
)
_register(
    ModelSpec(
        name="lenet_b",
        tutorial="003",
        description="lenet_a + Dropout .45 after the 128 and the 32 convolutions",
        input_shape=(28, 28, 1),
        trainable_params=83_850,
        non_trainable_params=0,
        layers=_layers(*_LENET_B_LAYERS),
        recipe="tut003",
        output="softmax",
        reported_accuracy=0.9776,
    )
)
_register(
    ModelSpec(
        name="lenet_c",
        tutorial="003",
        description="lenet_a + local response normalization after each of the two pools",
        input_shape=(28, 28, 1),
        trainable_params=83_850,
        non_trainable_params=0,
        layers=_layers(*_LENET_C_LAYERS),
        recipe="tut003",
        output="softmax",
        reported_accuracy=0.9872,
    )
)
_register(
    ModelSpec(
        name="lenet_d",
        tutorial="003",
        description="deeper LeNet with LRN: Conv8 k5 s2 -> Conv16 k5 -> AvgPool2 -> LRN -> Conv32 x2 -> AvgPool3 s2 "
        "-> LRN -> Conv64 k2 x2 -> Conv128 k3 valid -> Conv32 k1 -> Dense 10 softmax",
        input_shape=(28, 28, 1),
        trainable_params=120_330,
        non_trainable_params=0,
        layers=_layers(
            ("conv1", (14, 14, 8), 208),
            ("conv2", (14, 14, 16), 3_216),
            ("pool1", (7, 7, 16), 0),
            ("lrn1", (7, 7, 16), 0),
            ("conv3", (7, 7, 32), 4_640),
            ("conv4", (7, 7, 32), 9_248),
            ("pool2", (3, 3, 32), 0),
            ("lrn2", (3, 3, 32), 0),
            ("conv5", (3, 3, 64), 8_256),
            ("conv6", (3, 3, 64), 16_448),
            ("conv7", (1, 1, 128), 73_856),
            ("conv8", (1, 1, 32), 4_128),
            ("flatten", (32,), 0),
            ("dense", (10,), 330),
        ),
        recipe="tut003",
        output="softmax",
        reported_accuracy=0.9902,
    )
)
_register(
    ModelSpec(
        name="inception_e",
        tutorial="003",
        description="lenet_c with each conv stage replaced by a GoogLeNet-style inception block "
        "(filters [8, 16, 4, 4, 12, 2] = 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj)",
        input_shape=(28, 28, 1),
        trainable_params=39_410,
        non_trainable_params=0,
        layers=_layers(
            ("conv1", (14, 14, 8), 208),
            ("pool1", (7, 7, 8), 0),
            ("lrn1", (7, 7, 8), 0),
            ("inception1", (7, 7, 26), 2_062),
            ("pool2", (3, 3, 26), 0),
            ("lrn2", (3, 3, 26), 0),
            ("inception2", (3, 3, 26), 2_602),
            ("conv4", (1, 1, 128), 30_080),
            ("conv5", (1, 1, 32), 4_128),
            ("flatten", (32,), 0),
            ("dense", (10,), 330),
        ),
        recipe="tut003",
        output="softmax",
        notes="the tutorial's code stops at the block's signature; this is a reconstruction (see README)",
    )
)
_DATACAMP_LAYERS = (
    ("conv1", (28, 28, 32), 320),
    ("pool1", (14, 14, 32), 0),
    ("conv2", (14, 14, 64), 18_496),
    ("pool2", (7, 7, 64), 0),
    ("conv3", (7, 7, 128), 73_856),
    ("pool3", (4, 4, 128), 0),
    ("flatten", (2048,), 0),
    ("fc1", (128,), 262_272),
    ("out", (10,), 1_290),
)
_register(
    ModelSpec(
        name="datacamp",
        tutorial="004",
        description="low-level tf.nn CNN: [Conv3x3 + bias + relu, MaxPool2 same] x (32, 64, 128) -> Dense 128 relu "
        "-> Dense 10; Xavier init on weights and biases",
        input_shape=(28, 28, 1),
        trainable_params=356_234,
        non_trainable_params=0,
        layers=_layers(*_DATACAMP_LAYERS),
        recipe="tut004",
        reported_accuracy=0.9187,
        notes="Fashion-MNIST; reported accuracy is the last epoch's (epoch 200); the printed log peaks at 0.9208 "
        "(epoch 132)",
    )
)
_register(
    ModelSpec(
        name="datacamp_dropout",
        tutorial="004",
        description="datacamp + Dropout .25, .25, .4 after the pools and .3 after the hidden dense layer (the "
        "tutorial's exercise against overfitting, with the rates of the DataCamp Keras tutorial it points to)",
        input_shape=(28, 28, 1),
        trainable_params=356_234,
        non_trainable_params=0,
        layers=_layers(
            *_insert_after(
                _insert_after(
                    _insert_after(
                        _insert_after(_DATACAMP_LAYERS, "pool1", ("drop1", (14, 14, 32), 0)),
                        "pool2",
                        ("drop2", (7, 7, 64), 0),
                    ),
                    "pool3",
                    ("drop3", (4, 4, 128), 0),
                ),
                "fc1",
                ("drop4", (128,), 0),
            )
        ),
        recipe="tut004",
    )
)

MODEL_NAMES: tuple[str, ...] = tuple(_CATALOG)
TRAINABLE_MODEL_NAMES: tuple[str, ...] = tuple(name for name, spec in _CATALOG.items() if spec.recipe)


def get_spec(name: str) -> ModelSpec:
    """The catalog entry for `name`; an unknown name raises ValueError listing the valid ones."""
    try:
        return _CATALOG[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}") from None


# ------------------------------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    """One tutorial's training procedure, with its hyperparameters as defaults. Overridable field by field."""

    name: str
    tutorial: str
    dataset: str  # "mnist" | "fashion_mnist"
    split: str  # see parity.data.SPLITS
    scale: float  # inputs = uint8 pixels / scale (1.0 keeps the raw 0-255 values, as tutorial 003 does)
    batch_size: int
    epochs: int
    optimizer: str  # "adam" | "rmsprop" (always with Keras / TF1 semantics)
    lr: float
    epsilon: float
    loop: str  # "tape" (001 custom loop), "tf1" (002/004 session loops), "fit" (003 model.fit)
    members: int = 1
    lr_decay_rate: float | None = None  # ExponentialDecay(lr, decay_steps, rate, staircase=True)
    lr_decay_epochs: float | None = None  # decay_steps expressed in epochs of optimizer steps
    # 001's ensembles: one optimizer for all members, stepped once per member per batch (quirk); False: one each
    shared_optimizer: bool = True
    augment: str | None = None  # "tut001": 4 rotated/shifted copies of every image
    shift_low: int = -2  # the tutorial's np.random.randint(-2, 2, 2) gives shifts -2..1 (quirk)
    shift_high: int = 2
    early_stopping_patience: int | None = None
    shuffle: bool = True  # 004 walks the training set in a fixed order (quirk)
    drop_last: bool = False  # 004 drops the last partial batch
    quirks: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        """Every field checked, so that a typo in `--set` fails with a message instead of training nonsense."""
        problems = []

        def check(name, ok, expected):
            if not ok:
                problems.append(f"{name}={getattr(self, name)!r} (expected {expected})")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check("dataset", self.dataset in ("mnist", "fashion_mnist"), "mnist or fashion_mnist")
        check("split", self.split in ("full", "val5k", "halftest"), "full, val5k or halftest")
        check("scale", is_number(self.scale) and self.scale > 0, "a number > 0")
        for name in ("batch_size", "epochs", "members"):
            check(name, is_int(getattr(self, name)) and getattr(self, name) >= 1, "an integer >= 1")
        check("optimizer", self.optimizer in ("adam", "rmsprop"), "adam or rmsprop")
        check("loop", self.loop in ("tape", "tf1", "fit"), "tape, tf1 or fit")
        for name in ("lr", "epsilon"):
            check(name, is_number(getattr(self, name)) and getattr(self, name) > 0, "a number > 0")
        for name in ("lr_decay_rate", "lr_decay_epochs"):
            value = getattr(self, name)
            check(name, value is None or (is_number(value) and value > 0), "none or a number > 0")
        check("augment", self.augment in (None, "tut001", "tut001_online"), "none, tut001 or tut001_online")
        check("shift_low", is_int(self.shift_low) and is_int(self.shift_high) and self.shift_low < self.shift_high,
              "integers with shift_low < shift_high")
        check("early_stopping_patience",
              self.early_stopping_patience is None or (is_int(self.early_stopping_patience)
                                                       and self.early_stopping_patience >= 1), "none or an integer >= 1")
        for name in ("shared_optimizer", "shuffle", "drop_last"):
            check(name, isinstance(getattr(self, name), bool), "true or false")
        if problems:
            raise ValueError(f"recipe {self.name}: invalid " + "; ".join(problems))

    def replace(self, **overrides) -> Recipe:
        import dataclasses

        fields = [f.name for f in dataclasses.fields(self)]
        unknown = set(overrides) - set(fields)
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}; the fields are: {', '.join(fields)}")
        return dataclasses.replace(self, **overrides)


RECIPES: dict[str, Recipe] = {
    "tut001_cnn": Recipe(
        name="tut001_cnn", tutorial="001", dataset="mnist", split="full", scale=255.0, batch_size=100, epochs=15,
        optimizer="adam", lr=1e-3, epsilon=1e-7, loop="tape",
        quirks=("train accuracy is measured in eval mode after each step, on the batch just trained on",),
    ),
    "tut001_ensemble": Recipe(
        name="tut001_ensemble", tutorial="001", dataset="mnist", split="full", scale=255.0, batch_size=100,
        epochs=15, optimizer="adam", lr=1e-3, epsilon=1e-7, loop="tape", members=3,
        quirks=("one Adam shared by all members: its step counter advances once per member per batch",),
    ),
    "tut001_best": Recipe(
        name="tut001_best", tutorial="001", dataset="mnist", split="full", scale=255.0, batch_size=100, epochs=15,
        optimizer="adam", lr=1e-3, epsilon=1e-7, loop="tape", members=5, lr_decay_rate=0.5, lr_decay_epochs=25.0,
        augment="tut001",
        quirks=(
            "one Adam shared by all 5 members: it steps 5x per batch, so decay_steps = 300000/100*5*5 halves "
            "the rate every 5 epochs, not every 25",
            "shift = np.random.randint(-2, 2, 2) draws -2..1, never +2",
            "the printed loss divides the sum over 5 members by 3",
        ),
    ),
    "tut002": Recipe(
        name="tut002", tutorial="002", dataset="mnist", split="val5k", scale=255.0, batch_size=50, epochs=10,
        optimizer="adam", lr=1e-3, epsilon=1e-8, loop="tf1",
        quirks=("the printed train loss/accuracy are the last batch's, not the epoch's",),
    ),
    "tut003": Recipe(
        name="tut003", tutorial="003", dataset="mnist", split="halftest", scale=1.0, batch_size=32, epochs=100,
        optimizer="rmsprop", lr=1e-3, epsilon=1e-7, loop="fit", early_stopping_patience=10,
        quirks=(
            "pixels are fed unscaled (0-255)",
            "compile() names no optimizer, so Keras's default RMSprop(1e-3, rho .9, eps 1e-7) is used",
            "the test set is halved: first 5,000 = validation, last 5,000 = test",
        ),
    ),
    "tut004": Recipe(
        name="tut004", tutorial="004", dataset="fashion_mnist", split="val5k", scale=255.0, batch_size=128,
        epochs=200, optimizer="adam", lr=1e-3, epsilon=1e-8, loop="tf1", shuffle=False, drop_last=True,
        quirks=(
            "the training set is walked in the same order every epoch (no shuffling)",
            "the last partial batch is dropped",
            "the full test set is evaluated after every epoch (model selection on test)",
            "the printed and plotted train loss/accuracy are the last batch's, measured after its update (both "
            "frameworks here record the epoch's mean over the steps)",
        ),
    ),
}


def get_recipe(name: str) -> Recipe:
    """The recipe `name`; an unknown name raises ValueError listing the valid ones."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}") from None


def recipe_for(model: str, recipe: str | None = None, **overrides) -> Recipe:
    """The model's default recipe (or `recipe`), with `None`-valued overrides ignored."""
    spec = get_spec(model)
    name = recipe or spec.recipe
    if not name:
        raise ValueError(f"model {model!r} is a building block with no training recipe")
    base = get_recipe(name)
    if spec.members > 1 and "members" not in overrides:
        overrides["members"] = spec.members
    return base.replace(**{k: v for k, v in overrides.items() if v is not None})
