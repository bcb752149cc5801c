"""The model spec: how a model is rebuilt, one typed record that travels with the model."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
from torch import nn

from autoprune.models import create_model
from autoprune.models.smallcnn import SmallCNN
from autoprune.models.spec import (
    ModelSpec,
    copy_model,
    describe,
    model_label,
    set_spec,
    spec_of,
)


def test_a_built_model_carries_its_spec_through_library_copies():
    model = create_model("smallcnn", num_classes=7)
    spec = spec_of(model)
    assert spec == ModelSpec(name="smallcnn", kwargs={"num_classes": 7})
    assert spec_of(copy_model(model)) == spec
    assert spec_of(copy.deepcopy(model)) is None  # the record is not part of the module
    set_spec(model, spec.with_input_size((1, 28, 28)))
    assert spec_of(model).input_size == (1, 28, 28) and model_label(model) == "smallcnn"


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec(name="resnet20", kwargs={"num_classes": 10}, input_size=(3, 32, 32)),
        ModelSpec(factory="pkg.mod:build", kwargs={"width": 2}),
        ModelSpec(module="my.Net"),
    ],
)
def test_spec_json_round_trip(spec):
    assert ModelSpec.from_json(spec.to_json()) == spec


def test_a_module_built_otherwise_is_described_by_its_class():
    model = nn.Sequential(nn.Linear(2, 2))
    assert spec_of(model) is None
    assert describe(model).to_json() == {"module": "torch.nn.modules.container.Sequential"}
    assert model_label(model) == "Sequential"


def test_nothing_is_patched_onto_the_module_and_the_record_dies_with_it():
    model = create_model("smallcnn")
    assert vars(model).keys() == vars(SmallCNN()).keys()
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
