"""Tutorial 001's ensembles: N subclassed members, prediction = the sum of their logits."""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tf_ref")
class Ensemble(keras.Model):
    """Holds the members the tutorial keeps in a Python list; `call` sums their logits as its `evaluate` does."""

    def __init__(self, member_factory: Callable[..., keras.Model] | None = None, members: int | list = 3, **kwargs):
        kwargs.setdefault("name", "ensemble")
        super().__init__(**kwargs)
        if isinstance(members, list):  # ready-made members (from_config)
            self.members = members
        else:
            self.members = [member_factory(name=f"member{i}") for i in range(members)] if member_factory else []
        for i, member in enumerate(self.members):
            setattr(self, f"member{i}", member)

    def get_config(self) -> dict:
        """The members' own configs (a factory function cannot be saved): a `.keras` file rebuilds every member."""
        return {"name": self.name, "trainable": self.trainable,
                "members": [keras.saving.serialize_keras_object(member) for member in self.members]}

    @classmethod
    def from_config(cls, config: dict) -> Ensemble:
        config = dict(config)
        members = [keras.saving.deserialize_keras_object(member) for member in config.pop("members", [])]
        return cls(members=members, **config)

    def member_logits(self, inputs, training=False):
        return [member(inputs, training=training) for member in self.members]

    def call(self, inputs, training=False):
        return tf.add_n(self.member_logits(inputs, training=training))
