"""Prompt sets: counting, JSON files, the HPSv2 benchmark split (local folder and mocked hub), errors."""

import json
import os
import random

import huggingface_hub
import pytest

from alignprop import prompts
from alignprop.config import ConfigError, check
from alignprop.prompts import PromptError, make_prompt_set
from helpers import config as tiny


def _write_benchmark(folder, n=60):
    """Four style files in the format of zhwang/HPDv2's benchmark/*.json (a JSON list of strings)."""
    os.makedirs(folder, exist_ok=True)
    for style in prompts.HPS_V2_STYLES:
        items = [f"{style} prompt number {i}" for i in range(n)] + [f"{style} prompt number 0"]  # one duplicate
        with open(os.path.join(folder, f"{style}.json"), "w") as f:
            json.dump(items, f)
    return str(folder)


@pytest.fixture(autouse=True)
def _fresh_benchmark_cache():
    prompts.hps_v2_benchmark.cache_clear()
    yield
    prompts.hps_v2_benchmark.cache_clear()


def test_counting_sets_cover_objects_and_counts_and_hold_out_eval_objects():
    train, evaluation = make_prompt_set("counting"), make_prompt_set("eval_counting")
    assert len(train) == 6 * len(prompts.COUNTING_OBJECTS) and len(evaluation) == 6 * len(prompts.EVAL_COUNTING_OBJECTS)
    for prompt, meta in train.items + evaluation.items:
        word, noun = prompt.split(" ", 1)
        assert prompts.NUMBER_WORDS.index(word) + 1 == meta["count"]
        assert noun.startswith(meta["object"][:3])
    pairs = {(m["object"], m["count"]) for _, m in train.items}
    assert len(pairs) == len(train)  # every (object, count) once
    assert {m["object"] for _, m in train.items}.isdisjoint({m["object"] for _, m in evaluation.items})
    assert ("one apple", {"object": "apple", "count": 1}) in train.items
    assert ("three apples", {"object": "apple", "count": 3}) in train.items
    # Evaluation takes the first items in order: they already cover every object and several counts.
    first = evaluation.items[: len(prompts.EVAL_COUNTING_OBJECTS)]
    assert {m["object"] for _, m in first} == {o for o, _ in prompts.EVAL_COUNTING_OBJECTS}
    assert len({m["count"] for _, m in first}) > 3
    prompt, meta = train(random.Random(0))
    assert isinstance(prompt, str) and set(meta) == {"object", "count"}


def test_json_file_of_strings_and_of_objects(tmp_path):
    strings = tmp_path / "p.json"
    strings.write_text(json.dumps(["a cat", "a dog"]))
    assert make_prompt_set(f"from_file:{strings}").items == (("a cat", {}), ("a dog", {}))
    objects = tmp_path / "count.json"
    objects.write_text(json.dumps([{"prompt": "two mugs", "object": "mug", "count": 2}, "a lamp"]))
    assert make_prompt_set(f"from_file:{objects}").items == (
        ("two mugs", {"object": "mug", "count": 2}),
        ("a lamp", {}),
    )


def test_text_file_still_one_prompt_per_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\na cat\n\na dog\n")
    assert [p for p, _ in make_prompt_set(f"from_file:{path}").items] == ["a cat", "a dog"]


@pytest.mark.parametrize(
    "content, match",
    [
        ("[]", "empty list"),
        ("", "not valid UTF-8 JSON"),
        ("{\"prompt\": \"x\"}", "must hold a JSON list"),
        ("[\"ok\", 3]", r"entry 1 is 3"),
        ("[{\"object\": \"mug\"}]", r"entry 0 .* string \"prompt\""),
        ("[\"ok\", \"  \"]", "empty prompt"),
    ],
)
def test_bad_json_files_are_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PromptError, match=match):
        make_prompt_set(f"from_file:{path}")


def test_unreadable_and_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        make_prompt_set(f"from_file:{tmp_path / 'missing.json'}")
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PromptError, match="not valid UTF-8 JSON"):
        make_prompt_set(f"from_file:{binary}")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(PromptError, match="holds no prompts"):
        make_prompt_set(f"from_file:{empty}")


def test_hps_v2_split_from_local_folder_is_disjoint_deterministic_and_interleaved(tmp_path):
    folder = _write_benchmark(tmp_path / "benchmark")
    train = make_prompt_set(f"hps_v2_train:{folder}")
    evaluation = make_prompt_set(f"hps_v2_eval:{folder}")
    train_prompts, eval_prompts = [p for p, _ in train.items], [p for p, _ in evaluation.items]
    assert set(train_prompts).isdisjoint(eval_prompts)
    assert len(train_prompts) == len(set(train_prompts)) and len(eval_prompts) == len(set(eval_prompts))  # deduplicated
    assert len(train) + len(evaluation) == 4 * 60
    assert 0 < len(evaluation) < len(train) / 4
    assert all(prompts.hps_v2_split(p) == "eval" for p in eval_prompts)
    # The split depends only on the prompt text, pinned here so that a change of hash (which would move
    # prompts between train and eval across versions) cannot pass unnoticed.
    assert len(evaluation) == 29
    assert [p for p, _ in evaluation.items if p.startswith("anime")][:3] == [
        "anime prompt number 5", "anime prompt number 12", "anime prompt number 23",
    ]
    # Styles alternate, so the first eval items cover every style.
    styles = [m["style"] for _, m in evaluation.items[:4]]
    assert sorted(styles) == sorted(prompts.HPS_V2_STYLES)
    prompts.hps_v2_benchmark.cache_clear()
    assert make_prompt_set(f"hps_v2_eval:{folder}").items == evaluation.items


def test_hps_v2_downloads_each_file_once_from_the_hub_dataset(tmp_path, monkeypatch):
    folder = _write_benchmark(tmp_path / "hub")
    calls = []

    def fake_download(repo_id, filename, repo_type=None, **kwargs):
        calls.append((repo_id, filename, repo_type))
        return os.path.join(folder, os.path.basename(filename))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    train, evaluation = make_prompt_set("hps_v2_train"), make_prompt_set("hps_v2_eval")
    assert sorted(calls) == sorted(("zhwang/HPDv2", f"benchmark/{s}.json", "dataset") for s in prompts.HPS_V2_STYLES)
    assert len(train) + len(evaluation) == 4 * 60


def test_hps_v2_offline_error_names_dataset_files_and_local_option(offline):
    with pytest.raises(PromptError) as e:
        make_prompt_set("hps_v2_train")
    message = str(e.value)
    assert "'zhwang/HPDv2'" in message and "benchmark/anime.json" in message
    assert "hps_v2_train:FOLDER" in message and "config.prompt_fn" in message


def test_hps_v2_local_folder_missing_files(tmp_path):
    (tmp_path / "anime.json").write_text("[\"x\"]")
    with pytest.raises(PromptError, match=r"lacks .*concept-art.json"):
        make_prompt_set(f"hps_v2_eval:{tmp_path}")


@pytest.mark.parametrize("spec", ["nope", "from_file", "from_file:", "counting:extra", "simple_animals:x"])
def test_bad_specs_list_valid_names(spec):
    with pytest.raises(PromptError) as e:
        prompts.parse(spec, key="prompt_fn")
    message = str(e.value)
    assert f"config.prompt_fn={spec!r}" in message
    for name in ("counting", "eval_counting", "hps_v2_train", "from_file:PATH", "hps_v2_eval:FOLDER"):
        assert name in message


def test_validation_checks_local_prompt_paths(tmp_path):
    config = tiny()
    config.prompt_fn = f"hps_v2_train:{tmp_path / 'nowhere'}"
    config.eval_prompt_fn = f"from_file:{tmp_path / 'nothing.json'}"
    with pytest.raises(ConfigError) as e:
        check(config)
    message = str(e.value)
    assert f"config.prompt_fn='hps_v2_train:{tmp_path}/nowhere': HPSv2 benchmark folder" in message
    assert f"config.eval_prompt_fn='from_file:{tmp_path}/nothing.json': Prompt file" in message
    assert "does not exist" in message


@pytest.mark.parametrize(
    "entry,needle",
    [
        ({"prompt": "three apples", "object": "apple"}, "has no 'count' in its metadata"),
        ({"prompt": "three apples", "object": "apple", "count": "three"}, "has 'count': 'three'; it must be a whole"),
        ({"prompt": "three apples", "object": "apple", "count": 2.5}, "has 'count': 2.5"),
        ({"prompt": "three apples", "count": 3}, "has no 'object'"),
        ({"prompt": "three apples", "object": "", "count": 3}, "has 'object': ''; it must be an object name"),
    ],
)
def test_counting_prompt_file_without_a_usable_count_fails_at_start_up(tmp_path, entry, needle):
    path = tmp_path / "counts.json"
    good = {"prompt": "two cups", "object": "cup", "count": 2}
    path.write_text(json.dumps([good, entry]))
    config = tiny()
    config.reward_fn = "object_count"
    config.prompt_fn, config.eval_prompt_fn = f"from_file:{path}", "eval_counting"
    with pytest.raises(ConfigError) as e:
        check(config)
    message = str(e.value)
    assert f"config.prompt_fn='from_file:{path}': prompt 'three apples' {needle}" in message
    assert "use counting or eval_counting, or a JSON prompt file with object/count keys" in message
    assert "config.reward_fn='object_count'" in message
    # The same file is fine for a reward that needs no metadata; counts like "3" and 3.0 are whole numbers.
    config.reward_fn = "aesthetic"
    check(config)
    path.write_text(json.dumps([good, {"prompt": "three apples", "object": "apple", "count": "3"},
                                {"prompt": "one egg", "object": "egg", "count": 1.0}]))
    config.reward_fn = "object_count"
    check(config)


@pytest.mark.parametrize("content,needle", [(b"# a comment\n", "holds no prompts"), (b"\xff\xfe bad", "not UTF-8")])
def test_unusable_prompt_file_fails_at_start_up(tmp_path, content, needle):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    config = tiny()
    config.eval_prompt_fn = f"from_file:{path}"
    with pytest.raises(ConfigError) as e:
        check(config)
    assert f"config.eval_prompt_fn='from_file:{path}': Prompt file '{path}' " in str(e.value)
    assert needle in str(e.value)
