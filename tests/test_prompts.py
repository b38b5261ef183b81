import random

import pytest

from alignprop import prompts


def test_registry_and_disjoint_eval_animals():
    train = prompts.make_prompt_set("simple_animals")
    evals = prompts.make_prompt_set("eval_simple_animals")
    assert len(train) >= 40 and len(evals) >= 6
    assert not {p for p, _ in train.items} & {p for p, _ in evals.items}
    prompt, metadata = train(random.Random(0))
    assert prompt in prompts.SIMPLE_ANIMALS and metadata == {}


def test_seeded_draws_are_reproducible():
    s = prompts.make_prompt_set("simple_animals")
    a = [s(random.Random(1)) for _ in range(3)]
    b = [s(random.Random(1)) for _ in range(3)]
    assert a == b


def test_unknown_name_lists_valid_ones():
    with pytest.raises(prompts.PromptError) as e:
        prompts.make_prompt_set("animals")
    assert "simple_animals" in str(e.value) and "from_file:PATH" in str(e.value)


def test_from_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red car\n\n# comment\na blue bird\n", encoding="utf-8")
    s = prompts.make_prompt_set(f"from_file:{f}")
    assert [p for p, _ in s.items] == ["a red car", "a blue bird"]


@pytest.mark.parametrize(
    "content,needle", [(b"\n# only a comment\n", "holds no prompts"), (b"\xff\xfe\x00bad", "not UTF-8")]
)
def test_bad_files(tmp_path, content, needle):
    f = tmp_path / "p.txt"
    f.write_bytes(content)
    with pytest.raises(prompts.PromptError, match=needle):
        prompts.make_prompt_set(f"from_file:{f}")


def test_missing_file():
    with pytest.raises(prompts.PromptError, match="does not exist"):
        prompts.make_prompt_set("from_file:/no/such/file.txt")
