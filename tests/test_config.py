"""Config loading: shipped configs, error reporting, immutability, and the training hash."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ctloop.config import CtloopConfig, config_from_dict, config_warnings, load_config
from ctloop.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(REPO.glob("configs/*.yaml")) + sorted(REPO.glob("src/ctloop/quickstart/*.yaml"))


def _write(tmp_path: Path, text: str, name: str = "ctloop.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _problems(exc_info: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    """Problems keyed by the dotted key each one names (the text before the first ':')."""
    return {p.split(":", 1)[0]: p for p in exc_info.value.problems}


# -- shipped configs -----------------------------------------------------------------------------


def test_shipped_configs_are_found():
    names = {p.relative_to(REPO).as_posix() for p in SHIPPED}
    assert {"configs/production.example.yaml", "src/ctloop/quickstart/quickstart.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.relative_to(REPO).as_posix() for p in SHIPPED])
def test_shipped_config_validates(path):
    config = load_config(path)
    assert isinstance(config, CtloopConfig)
    assert config.model.base


def test_production_example_values_are_read():
    config = load_config(REPO / "configs/production.example.yaml")
    assert config.model.base == "meta-llama/Llama-3.2-1B"
    assert config.model.dtype == "bfloat16"
    assert config.model.max_seq_tokens == 2048
    assert config.data.min_rows == 1000
    assert config_warnings(config) == []  # its holdout can reach gate.min_examples
    assert config.replay.ratio == 0.25
    assert config.gate.max_old_regression == 0.01
    assert config.registry.model_name == "support-bot-adapter"
    assert config.workspace == Path("/var/lib/ctloop")


def _setting_lines(path: Path) -> dict[tuple[str, str], str]:
    """(section, key) -> the comment of its line, for every top-level scalar and every key one level
    into a section ("" for the top level)."""
    import re

    found, section = {}, ""
    for line in path.read_text().splitlines():
        match = re.match(r"^( {0,2})([a-z_]+):(.*)$", line)
        if not match:
            continue
        indent, key, rest = match.groups()
        comment = rest.partition("#")[2]
        if not indent and not rest.partition("#")[0].strip():
            section = key  # a section's own line
            continue
        found[(section if indent else "", key)] = comment
    return found


def _default(section: str, key: str):
    model = CtloopConfig if not section else CtloopConfig.model_fields[section].annotation
    field = model.model_fields[key]
    value = field.default_factory() if field.default_factory else field.default
    return value.model_dump() if hasattr(value, "model_dump") else value


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "[]" if value == [] else "{}" if value == {} else str(value)


def test_the_production_example_states_its_defaults_truthfully():
    """#29: it said every key was shown with its default unless noted, and 55 were not. Now a value
    that is not the default says "(default: X)" with the true default, and a note never sits on a
    default value."""
    import yaml
    from pydantic_core import PydanticUndefined

    path = REPO / "configs/production.example.yaml"
    raw = yaml.safe_load(path.read_text())
    wrong = []
    for (section, key), comment in _setting_lines(path).items():
        value = raw[section][key] if section else raw[key]
        default = _default(section, key)
        if default is PydanticUndefined:
            ok = "(required)" in comment
        elif value == default or _yaml(value) == _yaml(default):
            ok = "(default:" not in comment
        else:
            ok = f"(default: {_yaml(default)}" in comment
        if not ok:
            wrong.append(f"{section}.{key}: {value!r}, default {default!r}, comment {comment.strip()!r}")
    assert not wrong, wrong


def test_the_local_twin_has_the_production_settings_but_the_site_lines():
    """configs/production.local.yaml: the same keys, and the same values on every line the example
    does not mark [site]; each line it changes says what production has there ([local])."""
    import yaml

    example_path, twin_path = REPO / "configs/production.example.yaml", REPO / "configs/production.local.yaml"
    example, twin = yaml.safe_load(example_path.read_text()), yaml.safe_load(twin_path.read_text())
    example_lines, twin_lines = _setting_lines(example_path), _setting_lines(twin_path)
    assert set(example_lines) == set(twin_lines)
    for (section, key), comment in example_lines.items():
        ours = twin[section][key] if section else twin[key]
        theirs = example[section][key] if section else example[key]
        if "[site]" not in comment:
            assert ours == theirs, (section, key)
        elif ours != theirs and key not in ("golden", "rules"):  # those two change below their own line
            assert "[local]" in twin_lines[(section, key)], (section, key)
    config = load_config(twin_path)
    assert config.registry.tracking_uri is None and config.shadow.store_url is None and not config.publish.targets


@pytest.mark.slow
def test_a_cycle_runs_with_the_local_twin(tiny_base, tmp_path):
    """The twin is runnable: a cycle on the quickstart's new data with its settings (its tiny base
    model is the test's), every production rule in the gate's reasons."""
    import yaml

    from ctloop.cycle.run import run_cycle
    from ctloop.workspace import Workspace

    raw = yaml.safe_load((REPO / "configs/production.local.yaml").read_text())
    raw["model"]["base"] = str(tiny_base)
    raw["workspace"] = str(tmp_path / "ws")
    config = config_from_dict(raw, base_dir=REPO / "configs")
    result = run_cycle(config, REPO / "src/ctloop/quickstart/new_domain.jsonl", Workspace(config.workspace).create())
    assert result.status in ("registered", "rejected", "inconclusive"), result
    gate = (tmp_path / "ws" / "cycles" / result.cycle_id / "gate.json").read_text()
    assert "golden golden_faq: loss" in gate and "token_f1 on golden_faq" in gate, gate[:2000]


# -- every problem at once -----------------------------------------------------------------------

MANY_MISTAKES = """\
model:
  dtype: float8
data:
  min_row: 3
  max_bad_fraction: 1.5
trian:
  seed: 1
"""


def test_all_problems_reported_at_once(tmp_path):
    path = _write(tmp_path, MANY_MISTAKES)
    with pytest.raises(ConfigError) as exc_info:
        load_config(path)
    problems = _problems(exc_info)
    assert set(problems) == {"model.base", "model.dtype", "data.min_row", "data.max_bad_fraction", "trian"}
    assert exc_info.value.source == str(path)
    assert str(exc_info.value).startswith(f"5 problems in {path}:")
    for problem in exc_info.value.problems:
        assert f"  - {problem}" in str(exc_info.value)


@pytest.mark.parametrize(
    ("key", "fragments"),
    [
        ("trian", ["unknown key", "did you mean 'train'?"]),
        ("data.min_row", ["unknown key", "did you mean 'min_rows'?", "allowed keys here:"]),
        ("data.max_bad_fraction", ["got 1.5", "set it to a value <= 1"]),
        ("model.dtype", ["got 'float8'", "use one of", "'bfloat16'"]),
        ("model.base", ["required but missing", "add it"]),
    ],
    ids=["typo-top-level", "typo-in-section", "out-of-range", "wrong-literal", "missing-model-base"],
)
def test_each_problem_names_key_and_fix(tmp_path, key, fragments):
    with pytest.raises(ConfigError) as exc_info:
        load_config(_write(tmp_path, MANY_MISTAKES))
    problem = _problems(exc_info)[key]
    assert problem.startswith(f"{key}: ")
    for fragment in fragments:
        assert fragment in problem


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"model": {"base": "m", "max_seq_tokens": 4}}, "model.max_seq_tokens", "set it to a value >= 8"),
        ({"model": {"base": "m"}, "data": {"holdout_fraction": 0}}, "data.holdout_fraction", "set it to a value > 0"),
        ({"model": {"base": "m"}, "replay": {"ratio": 1}}, "replay.ratio", "set it to a value < 1"),
        ({"model": {"base": "m"}, "gate": {"first_cycle": "always"}}, "gate.first_cycle", "use one of"),
        (
            {"model": {"base": "m"}, "registry": {"model_name": "a b"}},
            "registry.model_name",
            "use only characters matching",
        ),
        ({"model": {"base": "m"}, "train": {"seed": "abc"}}, "train.seed", "correct the value's type"),
        ({}, "model", "required but missing"),
    ],
    ids=["ge", "gt", "lt", "literal", "pattern", "type", "missing-section"],
)
def test_single_problem_hint(raw, key, fragment):
    with pytest.raises(ConfigError) as exc_info:
        config_from_dict(raw)
    assert len(exc_info.value.problems) == 1
    problem = exc_info.value.problems[0]
    assert problem.startswith(f"{key}: ")
    assert fragment in problem


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("model: [unclosed\n", "not valid YAML"),
        ("model:\n  base: x\n bad-indent: 1\n", "not valid YAML"),
        ("- model\n- data\n", "the top level must be a mapping"),
        ("just a string\n", "the top level must be a mapping"),
        ("", "the top level must be a mapping"),
    ],
    ids=["unclosed-flow", "bad-indent", "list", "scalar", "empty-file"],
)
def test_unreadable_yaml_gives_clear_error(tmp_path, text, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc_info:
        load_config(path)
    assert len(exc_info.value.problems) == 1
    assert fragment in exc_info.value.problems[0]
    assert str(path) in str(exc_info.value)


def test_invalid_utf8_yaml_gives_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"model:\n  base: caf\xe9\n")
    with pytest.raises(ConfigError) as exc_info:
        load_config(path)
    assert "not valid YAML" in exc_info.value.problems[0]


def test_missing_file_gives_config_error(tmp_path):
    with pytest.raises(ConfigError) as exc_info:
        load_config(tmp_path / "nope.yaml")
    assert "does not exist" in exc_info.value.problems[0]


# -- relative paths ------------------------------------------------------------------------------


def test_relative_model_base_resolves_next_to_config(tmp_path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    config = load_config(_write(tmp_path, "model:\n  base: models/tiny\n"))
    assert config.model.base == str((tmp_path / "models" / "tiny").resolve())


def test_relative_model_base_that_does_not_exist_is_kept_as_hub_id(tmp_path):
    config = load_config(_write(tmp_path, "model:\n  base: org/model\n"))
    assert config.model.base == "org/model"


def test_relative_workspace_resolves_next_to_config(tmp_path):
    (tmp_path / "ws").mkdir()
    config = load_config(_write(tmp_path, "workspace: ws\nmodel:\n  base: org/model\n"))
    assert config.workspace == (tmp_path / "ws").resolve()


# -- frozen --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        (None, "workspace", Path("x")),
        ("model", "base", "other"),
        ("data", "min_rows", 1),
        ("replay", "ratio", 0.5),
        ("gate", "first_cycle", "accept"),
        ("registry", "model_name", "x"),
    ],
    ids=["root", "model", "data", "replay", "gate", "registry"],
)
def test_config_is_frozen(section, field, value):
    config = config_from_dict({"model": {"base": "m"}})
    target = config if section is None else getattr(config, section)
    before = getattr(target, field)
    with pytest.raises(ValidationError, match="frozen"):
        setattr(target, field, value)
    assert getattr(target, field) == before


# -- training hash -------------------------------------------------------------------------------

BASE_RAW = {"model": {"base": "m"}}


def _with(section: str, field: str, value) -> dict:
    if section == "":
        return {**BASE_RAW, field: value}
    merged = {**BASE_RAW, section: {**BASE_RAW.get(section, {}), field: value}}
    return merged


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("model", "base", "other"),
        ("model", "max_seq_tokens", 256),
        ("model", "dtype", "bfloat16"),
        ("data", "min_rows", 5),
        ("replay", "ratio", 0.5),
        ("replay", "enabled", False),
        ("lora", "r", 8),
        ("train", "seed", 1),
        ("train", "learning_rate", 1e-3),
        ("eval", "batch_tokens", 1024),
        ("gate", "first_cycle", "accept"),
    ],
    ids=[
        "model.base",
        "model.max_seq_tokens",
        "model.dtype",
        "data.min_rows",
        "replay.ratio",
        "replay.enabled",
        "lora.r",
        "train.seed",
        "train.learning_rate",
        "eval.batch_tokens",
        "gate.first_cycle",
    ],
)
def test_training_hash_changes_with_training_fields(section, field, value):
    base = config_from_dict(BASE_RAW).training_hash()
    changed = config_from_dict(_with(section, field, value)).training_hash()
    assert len(base) == 16
    assert changed != base


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("", "workspace", "/somewhere/else"),
        ("registry", "model_name", "other-name"),
        ("registry", "experiment", "other-exp"),
        ("registry", "tracking_uri", "http://mlflow:5000"),
        ("registry", "promote_first", False),
    ],
    ids=["workspace", "registry.model_name", "registry.experiment", "registry.tracking_uri", "registry.promote_first"],
)
def test_training_hash_ignores_storage_fields(section, field, value):
    assert config_from_dict(_with(section, field, value)).training_hash() == config_from_dict(BASE_RAW).training_hash()


def test_training_hash_is_stable_and_default_equivalent():
    explicit = config_from_dict({"model": {"base": "m", "dtype": "float32"}, "train": {"seed": 0}})
    assert explicit.training_hash() == config_from_dict(BASE_RAW).training_hash()


def test_settings_added_at_their_defaults_keep_the_cycle_ids_of_before():
    """A cycle id is the data, this hash and the base model's revision: a settings field added with
    a default must not change it, or an upgrade would re-run every finished cycle and stop crashed
    ones from resuming. The hash of {"model": {"base": "x"}} as ctloop 0.1 computed it."""
    assert config_from_dict({"model": {"base": "x"}}).training_hash() == "c16aa2a1a8d312c9"
    changed = {
        "train": {"chat_loss": "all_assistant"},
        "gate": {"require_seed_calibration": True},
    }
    for section, values in changed.items():
        assert config_from_dict({"model": {"base": "x"}, section: values}).training_hash() != "c16aa2a1a8d312c9"
    presentation = {"eval": {"report_examples": 9}, "model": {"base": "x", "threads": 3}, "judge": {"min_pairs": 5}}
    for section, values in presentation.items():
        raw = {"model": {"base": "x"}} | {section: values}
        assert config_from_dict(raw).training_hash() == "c16aa2a1a8d312c9", section


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"drift": {"permutations": 30}}, "use at least 39"),
        ({"drift": {"permutations": 50, "alpha": 0.01}}, "use at least 199"),
        ({"serve": {"max_tokens": 32}}, "every request without max_tokens would be refused"),
        ({"publish": {"targets": [{"kind": "vllm"}]}}, "needs urls"),
        ({"orchestration": {"production_window": "soon"}}, "neither a duration"),
    ],
    ids=["drift-b-too-small", "drift-b-for-alpha", "serve-tokens", "publish-target", "window"],
)
def test_cross_field_rules_name_the_keys_and_the_fix(raw, needle):
    with pytest.raises(ConfigError, match=needle) as caught:
        config_from_dict({"model": {"base": "m"}, **raw})
    assert "correct the value's type" not in str(caught.value)


def test_a_drift_setting_that_can_fire_is_accepted():
    assert config_from_dict({"model": {"base": "m"}, "drift": {"permutations": 39}}).drift.permutations == 39
