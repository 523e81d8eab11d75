from pathlib import Path

import pytest

from peftlab.config import RunConfig, build_config, config_from_dict, flatten, leaves, load_yaml
from peftlab.errors import PeftlabError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_study_settings():
    cfg = build_config()
    assert (cfg.method.method, cfg.method.lora_r, cfg.method.lora_alpha) == ("lora", 8, 16.0)
    assert cfg.prompt.template == "alpaca" and cfg.data.n_test == 2000


def test_flags_are_unique_and_cover_the_required_names():
    flags = [leaf.flag for leaf in leaves()]
    assert len(flags) == len(set(flags))
    required = {"--model", "--data", "--n-train", "--n-test", "--method", "--epochs", "--lr", "--lora-r",
                "--lora-alpha", "--lora-dropout", "--virtual-tokens", "--max-input-tokens", "--seed",
                "--adapter", "--out"}
    assert required <= set(flags)
    assert all(leaf.help for leaf in leaves())


def test_merge_order_defaults_yaml_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {n_train: 150, n_test: all}\nmethod: {lora_r: 4}\ntrain: {lr: 1e-3}\n")
    cfg = build_config(flatten(load_yaml(path), str(path)), {"method.lora_r": "16"})
    assert cfg.data.n_train == 150 and cfg.data.n_test is None
    assert cfg.method.lora_r == 16       # flag beats YAML
    assert cfg.train.lr == 1e-3          # YAML beats default, "1e-3" typed as float
    assert cfg.train.epochs == 2         # default kept


@pytest.mark.parametrize("layer, message", [
    ({"method.lora_r": "0"}, "lora_r"),
    ({"method.lora_r": "eight"}, "not a valid int"),
    ({"train.lr": "-1"}, "out of range"),
    ({"method.lora_dropout": "1.5"}, "lora_dropout"),
    ({"prompt.truncation": "middle"}, "truncation"),
    ({"method.virtual_tokens": "-3"}, "virtual_tokens"),
    ({"data.n_test": "0"}, "n_test"),
    ({"train.nonsense": 1}, "unknown config key"),
])
def test_bad_values_are_refused_with_the_key_named(layer, message):
    with pytest.raises(PeftlabError, match=message):
        build_config(layer)


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epoch: 3}\n")
    with pytest.raises(PeftlabError, match="unknown key 'train.epoch'"):
        flatten(load_yaml(path), str(path))


def test_yaml_with_python_tags_is_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(PeftlabError, match="not valid YAML"):
        load_yaml(path)


def test_round_trip_through_the_record():
    cfg = build_config({"data.n_train": 50, "method.method": "prompt-tuning", "prompt.label_words":
                        "{negative: bad, positive: good}"})
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again, RunConfig)


def test_every_shipped_yaml_config_is_valid():
    # configs/accelerate/ holds accelerate's launch configs, checked in tests/unit/test_distributed.py
    files = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)
    assert files, "configs/ ships no YAML"
    for path in files:
        data = load_yaml(path)
        if "cases" in data:  # a sweep of cases: every cell built and validated as the sweep builds it
            from peftlab.experiments import load_sweep

            assert load_sweep(path).cells
        data.pop("cases", None)
        grid = data.pop("grid", None) if isinstance(data, dict) else None
        data.pop("sweep", None)
        data.pop("search", None)  # tune YAMLs (configs/tune/): their search space is checked in test_tune.py
        data.pop("tune", None)
        cfg = build_config(flatten(data, str(path)))
        assert isinstance(cfg, RunConfig)
        first = path.read_text().splitlines()[0]
        assert first.startswith("# peftlab"), f"{path} must start with the command that runs it"
        if grid:
            for key in grid:
                assert key in {leaf.key for leaf in leaves()}, f"{path}: grid key {key} unknown"


def test_method_dependent_defaults_are_resolved_into_the_config():
    lora = build_config({"method.method": "lora"})
    assert (lora.train.lr, lora.train.loss) == (5e-4, "lm")
    pt = build_config({"method.method": "prompt-tuning"})
    assert (pt.train.lr, pt.train.loss) == (3e-2, "classes")
    explicit = build_config({"method.method": "prompt-tuning", "train.lr": "0.1", "train.loss": "lm"})
    assert (explicit.train.lr, explicit.train.loss) == (0.1, "lm")
