from pathlib import Path

import pytest

from gemcut.config import load_config, parse_override
from gemcut.errors import ConfigError

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted(ROOT.glob("examples/*.yaml")) + sorted(ROOT.glob("gemcut/presets/*.yaml"))


def test_override_types():
    assert parse_override("train.lr=1e-4") == (["train", "lr"], 1e-4)
    assert parse_override("data.train=[a.jsonl, b.jsonl]") == (["data", "train"], ["a.jsonl", "b.jsonl"])
    assert parse_override("adapter.dora=true") == (["adapter", "dora"], True)


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lrr=3"])
    assert "unknown key 'train.lrr'" in str(e.value)
    assert "did you mean 'train.lr'" in str(e.value)


def test_wrong_type_names_field_and_value():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.batch_size=lots"])
    assert "train.batch_size" in str(e.value) and "'lots'" in str(e.value)


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["adapter.method=prefix_tuning"])
    msg = str(e.value)
    assert "adapter.method" in msg and "'lora'" in msg and "'full'" in msg


def test_cross_field_check_names_fix():
    with pytest.raises(ConfigError, match="adapter.method=lora"):
        load_config(None, ["objective.kind=dpo", "adapter.method=full"])


def test_yaml_error_has_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        load_config(p)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path):
    load_config(path)


def test_a_replaced_key_says_what_to_write_instead():
    from gemcut.config import validate

    with pytest.raises(ConfigError, match=r"train.grad_accum is gone: .*train.batch_size=<old batch_size x grad_accum> and "
                                          r"train.micro_batch_size=<old batch_size>"):
        validate({"train": {"batch_size": 4, "grad_accum": 2}}, "run.yaml")
