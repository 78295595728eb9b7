import numpy as np
import pytest

from models.shapes import grammar


def test_grammar_has_90_scenes():
    scenes = grammar.all_scenes()
    assert len(scenes) == 90
    assert all(scene.colour != scene.background for scene in scenes)


def test_checker_reads_centred_scenes():
    for scene in grammar.all_scenes():
        assert grammar.read_scene(grammar.render(scene)) == scene


def test_checker_reads_random_sizes_and_positions():
    rng = np.random.default_rng(123)
    scenes = grammar.all_scenes()
    for i in range(900):
        scene = scenes[i % len(scenes)]
        assert grammar.read_scene(grammar.render(scene, rng)) == scene, f"draw {i}: {scene}"


def test_checker_reads_enlarged_renders():
    scene = grammar.Scene("yellow", "triangle", "black")
    assert grammar.read_scene(grammar.render(scene, size=128)) == scene


def test_checker_tolerates_noise():
    rng = np.random.default_rng(7)
    scene = grammar.Scene("green", "square", "white")
    image = grammar.render(scene).astype(np.int16) + rng.integers(-40, 41, (32, 32, 3))
    assert grammar.read_scene(np.clip(image, 0, 255).astype(np.uint8)) == scene


def test_checker_reports_missing_object():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[...] = grammar.PALETTE["blue"]
    assert grammar.read_scene(image) == grammar.Scene("", "", "blue")


def test_checker_rejects_grey_image():
    with pytest.raises(ValueError, match="expected an RGB image"):
        grammar.read_scene(np.zeros((32, 32), dtype=np.uint8))


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a red circle on a blue background", grammar.Scene("red", "circle", "blue")),
        ("  A Red Circle on a Blue background ", grammar.Scene("red", "circle", "blue")),
        ("a red circle on a red background", None),
        ("a purple circle on a blue background", None),
        ("a cat", None),
    ],
)
def test_parse_caption(caption, expected):
    assert grammar.parse_caption(caption) == expected


def test_adherence_counts_all_three_attributes():
    scene = grammar.Scene("red", "circle", "blue")
    image = grammar.render(scene)
    prompts = [scene.caption(), "a red square on a blue background", "a red circle on a green background"]
    assert grammar.adherence([image] * 3, prompts) == pytest.approx(1 / 3)


def test_adherence_rejects_prompt_outside_grammar():
    with pytest.raises(ValueError, match="does not follow"):
        grammar.adherence([grammar.render(grammar.all_scenes()[0])], ["a dog"])


def test_adherence_prompt_set_is_fixed():
    pairs = grammar.adherence_prompts()
    assert len(pairs) == 90
    assert len({prompt for prompt, _ in pairs}) == 90
    assert [seed for _, seed in pairs] == list(range(90))
