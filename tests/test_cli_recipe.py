"""A flag typed on the command line always wins over --preset / --recipe (or the command refuses
with the reason), even when its value equals the flag's default; the recipe's name then says so."""

import pytest

from smoothq.cli import quantize as cli
from smoothq.cli.app import build_parser, main, parse_args, subparser
from smoothq.cli.quantize import FLAG_FIELDS

# quantize options that are not recipe fields: what to load, where to write, how to evaluate and run
NOT_RECIPE = {
    "help",
    "model",
    "gguf_file",
    "dtype",
    "device",
    "preset",
    "recipe",
    "save_recipe",
    "output",
    "force",
    "eval",
    "data",
    "seqlen",
    "max_windows",
    "backend",
    "sequential",
    "activations",
    "device_map",
    "resume",
    "int8_attention",
}


def recipe_of(*flags):
    return cli._recipe(parse_args(["quantize", "model", *flags]))


def test_a_typed_flag_equal_to_its_default_overrides_the_preset():
    r = recipe_of("--preset", "best-w8a8", "--alpha", "0.8")  # 0.8 is --alpha's default; the preset says 0.65
    assert r.smoothing.alpha == 0.8 and r.name == "best-w8a8+alpha=0.8"
    r = recipe_of("--preset", "serve-w8a8", "--scheme", "W8A8", "--calib-seqlen", "256", "--rotate-inputs")
    assert r.scheme == "W8A8" and r.calibration.seqlen == 256 and r.rotate_inputs
    assert r.name == "serve-w8a8+rotate-inputs+calib-seqlen=256"  # the scheme was the preset's already


def test_untyped_flags_keep_the_preset_and_its_name():
    r = recipe_of("--preset", "best-w8a8", "--alpha", "0.65")
    assert r == recipe_of("--preset", "best-w8a8") and r.name == "best-w8a8" and r.smoothing.alpha == 0.65


def test_a_typed_flag_the_preset_cannot_take_is_refused_with_the_reason(capsys):
    assert main(["quantize", "model-not-loaded", "--preset", "best-o3", "--scheme", "W8A8", "-o", "unused"]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "--preset best-o3 with --scheme" in line[0] and "clip" in line[0], err


def test_the_overridden_name_is_what_a_saved_recipe_stores(tmp_path):
    recipe_of("--preset", "best-w8a8", "--alpha", "0.8").to_file(tmp_path / "r.json")
    assert cli.Recipe.from_file(tmp_path / "r.json").name == "best-w8a8+alpha=0.8"


def test_recipe_files_are_overridden_the_same_way(tmp_path):
    recipe_of("--preset", "best-o3").to_file(tmp_path / "mine.yaml")
    r = recipe_of("--recipe", str(tmp_path / "mine.yaml"), "--samples", "128", "--seed", "3")
    assert r.calibration.seed == 3 and r.rotation.seed == 3 and r.name == "best-o3+seed=3"


def test_every_quantize_option_is_a_recipe_field_or_named_as_not_one():
    dests = {a.dest for a in subparser(build_parser(), "quantize")._actions}
    assert dests - NOT_RECIPE == set(FLAG_FIELDS), "a new recipe flag: map it to its fields in cli.FLAG_FIELDS"


@pytest.mark.parametrize(
    "argv, typed",
    [
        (["quantize", "m", "--alpha", "0.8"], {"alpha"}),
        (["-q", "inspect", "m", "-o", "x", "--samples", "128"], {"quiet", "output", "samples"}),
    ],
)
def test_typed_options_are_the_options_on_the_command_line(argv, typed):
    assert parse_args(argv).typed - {"command", "model"} == typed
