import json

import pytest

from plugins.gguf import GGUFOptions


def test_defaults_round_trip_json():
    options = GGUFOptions()
    assert GGUFOptions.from_json(options.to_json()) == options
    assert json.loads(options.to_json()) == {"keep": [], "qtype": "Q8_0", "quantize_io": False, "version": 1}


def test_from_dict_converts_strings():
    options = GGUFOptions.from_dict({"qtype": "Q4_0", "keep": "conv_in, *.proj_out"})
    assert options.keep == ("conv_in", "*.proj_out")


def test_invalid_choice_names_field():
    with pytest.raises(ValueError, match=r"qtype must be one of \['Q8_0'.*got 'Q9_9'"):
        GGUFOptions(qtype="Q9_9")


def test_unknown_option_rejected():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bits'\]"):
        GGUFOptions.from_dict({"bits": 4})


def test_newer_version_rejected():
    with pytest.raises(ValueError, match="options version 2 is newer"):
        GGUFOptions(version=2)
