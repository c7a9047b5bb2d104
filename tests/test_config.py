"""Config dataclasses: validation, unknown keys, JSON round-trip, versions."""
import dataclasses
import json
import logging

import pytest
from hypothesis import given, settings, strategies as st

import vopt
from vopt.capture import CaptureConfig
from vopt.config import VoptConfig, config_from_dict
from vopt.errors import ConfigError, UnknownNameError
from vopt.optimize import OptimizeConfig
from vopt.passes.sdpa import SdpaConfig


def all_config_classes():
    vopt.registered_passes()  # import the passes so their configs register
    from vopt.config import _CONFIG_CLASSES

    return list(_CONFIG_CLASSES.values())


@pytest.mark.parametrize("cls", all_config_classes(), ids=lambda c: c.__name__)
def test_every_field_has_help_and_round_trips(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    cfg = cls()
    assert cls.from_json(cfg.to_json()) == cfg
    assert config_from_dict(json.loads(cfg.to_json())) == cfg


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        OptimizeConfig.from_dict({"pases": ["sdpa"]})
    assert "pases" in str(e.value) and "passes" in str(e.value) and "strict" in str(e.value)


def test_wrong_types_name_the_field():
    with pytest.raises(ConfigError, match="OptimizeConfig.strict"):
        OptimizeConfig(strict="yes")
    with pytest.raises(ConfigError, match="CaptureConfig.max_specializations must be >= 1"):
        CaptureConfig(max_specializations=0)
    with pytest.raises(ConfigError, match=r"OptimizeConfig.passes must be a list"):
        OptimizeConfig(passes="sdpa")
    with pytest.raises(ConfigError, match="CaptureConfig.max_specializations must be an integer"):
        CaptureConfig(max_specializations=True)


def test_nested_config_from_dict_and_type_check():
    cfg = OptimizeConfig.from_dict({"capture": {"max_specializations": 3}, "passes": ["sdpa"]})
    assert isinstance(cfg.capture, CaptureConfig) and cfg.capture.max_specializations == 3
    with pytest.raises(ConfigError, match="config of type 'CaptureConfig' given where 'OptimizeConfig'"):
        OptimizeConfig.from_dict(CaptureConfig().to_dict())


def test_unregistered_type_is_refused():
    with pytest.raises(UnknownNameError, match="os.system"):
        config_from_dict({"type": "os.system"})


def test_version_mismatch_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="vopt.config"):
        cfg = OptimizeConfig.from_dict({"version": 99})
    assert cfg.version == 99
    assert "version 99" in caplog.text


@settings(max_examples=40, deadline=None)
@given(
    passes=st.one_of(st.none(), st.lists(st.sampled_from(["sdpa", "canonicalize_attention"]), unique=True)),
    strict=st.booleans(),
    debug=st.booleans(),
    max_spec=st.integers(1, 64),
    stages=st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=8), max_size=3)),
)
def test_round_trip_property(passes, strict, debug, max_spec, stages):
    cfg = OptimizeConfig(passes=passes, strict=strict, debug=debug, capture=CaptureConfig(max_specializations=max_spec),
                         pass_configs={"sdpa": SdpaConfig(stages=stages)})
    back = OptimizeConfig.from_json(cfg.to_json())
    assert back == cfg
    assert isinstance(back.pass_configs["sdpa"], SdpaConfig)


def test_base_is_a_dataclass_with_version():
    assert VoptConfig().version == VoptConfig.VERSION
