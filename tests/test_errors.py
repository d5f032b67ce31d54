"""One base class for the errors alora raises on purpose; an unknown adapter is also a KeyError, printed plainly."""

import pytest

import alora
from alora import AloraError, UnknownAdapterError
from alora.train import DataError


def test_unknown_adapter_error_is_a_key_error_with_a_plain_message():
    e = UnknownAdapterError("no adapter named 'x' is loaded")
    assert isinstance(e, KeyError) and isinstance(e, AloraError)
    assert str(e) == "no adapter named 'x' is loaded"  # a bare KeyError would print it quoted
    assert str(KeyError("no adapter named 'x' is loaded")) == "\"no adapter named 'x' is loaded\""


@pytest.mark.parametrize("cls", [alora.AdapterError, alora.CheckpointError, alora.UnsupportedModelError,
                                 DataError])
def test_value_errors_of_the_package_derive_from_alora_error(cls):
    assert issubclass(cls, AloraError) and issubclass(cls, ValueError)


def test_unknown_adapter_names_raise_unknown_adapter_error(engine):
    with pytest.raises(UnknownAdapterError) as info:
        engine.forward_logits([1, 2, 3], adapter="nope")
    assert str(info.value).startswith("no adapter named 'nope' is loaded")
    with pytest.raises(UnknownAdapterError, match=r"^no demo adapter named \['nope'\]"):
        alora.load_demo_adapters(engine, ["nope"])


def test_one_except_clause_catches_adapter_folder_errors(engine, tmp_path):
    with pytest.raises(AloraError, match="no adapter_config.json"):
        engine.load_adapter("empty", tmp_path)
    with pytest.raises(AloraError, match="adapter folder not found"):
        engine.load_adapter("missing", tmp_path / "missing")
    assert "empty" not in engine.adapters and "missing" not in engine.adapters
