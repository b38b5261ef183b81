"""Prompt sets: a registry of names -> `PromptSet`, whose `__call__(rng)` returns `(prompt, metadata)`.

A prompt set is named by a spec string (`config.prompt_fn`, `config.eval_prompt_fn`):

- `simple_animals`, `eval_simple_animals`: animal names (aesthetic experiments; eval = unseen animals).
- `counting`, `eval_counting`: "<number word> <objects>" ("three apples"), counts 1-6, metadata
  `{object, count}` for the `object_count` reward; eval uses objects absent from training.
- `hps_v2_train`, `hps_v2_eval`: the HPSv2 benchmark prompts (hub dataset `zhwang/HPDv2`, files
  `benchmark/{anime,concept-art,paintings,photo}.json`, downloaded once into the hub cache), split into
  disjoint train/eval sets by a stable hash of each prompt. `hps_v2_train:FOLDER` reads the four files
  from a local folder instead (offline machines).
- `from_file:PATH`: one prompt per line, or, for a `.json` file, a JSON list of prompt strings or of
  `{"prompt": ..., <metadata keys>...}` objects.
"""

import dataclasses
import functools
import hashlib
import json
import os
import random

from alignprop.errors import UserError

# Common animals for the aesthetic experiments (the original trains on a list of this kind; prompt = the name).
SIMPLE_ANIMALS = [
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
    "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish",
    "shark", "whale", "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck",
    "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
]

# Animals absent from SIMPLE_ANIMALS: the paper's test of generalization to unseen prompts.
EVAL_SIMPLE_ANIMALS = [
    "cheetah", "elephant", "giraffe", "hippopotamus", "koala", "lobster", "octopus", "owl", "panda",
    "peacock", "penguin", "rhinoceros", "seal", "swan", "walrus", "jellyfish",
]

# Countable objects (singular, plural) for the object-count experiments: everyday things an
# open-vocabulary detector finds well. Evaluation objects are absent from training.
COUNTING_OBJECTS = [
    ("apple", "apples"), ("orange", "oranges"), ("banana", "bananas"), ("lemon", "lemons"),
    ("strawberry", "strawberries"), ("egg", "eggs"), ("donut", "donuts"), ("cupcake", "cupcakes"),
    ("cup", "cups"), ("bottle", "bottles"), ("book", "books"), ("candle", "candles"), ("ball", "balls"),
    ("balloon", "balloons"), ("chair", "chairs"), ("car", "cars"), ("cat", "cats"), ("dog", "dogs"),
    ("bird", "birds"), ("teddy bear", "teddy bears"), ("shoe", "shoes"), ("clock", "clocks"),
    ("umbrella", "umbrellas"), ("pencil", "pencils"),
]
EVAL_COUNTING_OBJECTS = [
    ("tomato", "tomatoes"), ("mug", "mugs"), ("duck", "ducks"), ("bicycle", "bicycles"),
    ("pumpkin", "pumpkins"), ("lamp", "lamps"),
]
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six")

# The HPSv2 benchmark prompts (Wu et al. 2023): 800 per style.
HPS_V2_REPO = "zhwang/HPDv2"
HPS_V2_STYLES = ("anime", "concept-art", "paintings", "photo")
# One prompt in this many (by a stable hash of its text) is held out for evaluation.
HPS_V2_EVAL_EVERY = 10

FILE_PREFIX = "from_file:"


class PromptError(UserError, ValueError):
    """A prompt set that cannot be used (unknown name, unreadable or empty file, metadata a reward lacks)."""


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """A fixed list of (prompt, metadata) items; calling it draws one item with the caller's RNG."""

    name: str
    items: tuple

    def __call__(self, rng: random.Random):
        prompt, metadata = rng.choice(self.items)
        return prompt, dict(metadata)

    def __len__(self):
        return len(self.items)


def _from_list(name, prompts):
    return PromptSet(name, tuple((p, {}) for p in prompts))


def counting(name, objects, numbers=NUMBER_WORDS):
    """'<number word> <objects>' prompts with metadata {object, count} for every object and count.

    Ordered so that any run of len(objects) consecutive items has every object once with varied counts
    (evaluation takes the first items in order): item (round r, object j) asks for count (j + r) % n + 1.
    """
    items = []
    for r in range(len(numbers)):
        for j, (singular, plural) in enumerate(objects):
            count = (j + r) % len(numbers) + 1
            noun = singular if count == 1 else plural
            items.append((f"{numbers[count - 1]} {noun}", {"object": singular, "count": count}))
    return PromptSet(name, tuple(items))


def _read_json_list(path, what):
    """A JSON file holding a non-empty list; PromptError otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PromptError(f"{what} {path!r} does not exist.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PromptError(f"{what} {path!r} is not valid UTF-8 JSON ({e}).") from None
    except OSError as e:
        raise PromptError(f"{what} {path!r} cannot be read: {e}") from None
    if not isinstance(data, list):
        raise PromptError(f"{what} {path!r} must hold a JSON list, not a {type(data).__name__}.")
    if not data:
        raise PromptError(f"{what} {path!r} holds an empty list (no prompts).")
    return data


def _from_json(path):
    """A JSON list of prompt strings or of {"prompt": ..., **metadata} objects."""
    items = []
    for i, entry in enumerate(_read_json_list(path, "Prompt file")):
        if isinstance(entry, str):
            items.append((entry, {}))
        elif isinstance(entry, dict) and isinstance(entry.get("prompt"), str):
            items.append((entry["prompt"], {k: v for k, v in entry.items() if k != "prompt"}))
        else:
            raise PromptError(
                f"Prompt file {path!r}: entry {i} is {entry!r}; each entry must be a prompt string or an object "
                f'with a string "prompt" and metadata keys, e.g. '
                f'{{"prompt": "three apples", "object": "apple", "count": 3}}.'
            )
    if any(not prompt.strip() for prompt, _ in items):
        raise PromptError(f"Prompt file {path!r} holds an empty prompt.")
    return PromptSet(FILE_PREFIX + path, tuple(items))


def from_file(path):
    """A `.json` file (see `_from_json`), or text with one prompt per line ('#' lines and blank lines skipped)."""
    if path.lower().endswith(".json"):
        return _from_json(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except FileNotFoundError:
        raise PromptError(f"Prompt file {path!r} does not exist.") from None
    except UnicodeDecodeError as e:
        raise PromptError(f"Prompt file {path!r} is not UTF-8 text ({e}).") from None
    except OSError as e:
        raise PromptError(f"Prompt file {path!r} cannot be read: {e}") from None
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise PromptError(f"Prompt file {path!r} holds no prompts (one prompt per line expected).")
    return _from_list(FILE_PREFIX + path, prompts)


def hps_v2_split(prompt):
    """'eval' for one prompt in HPS_V2_EVAL_EVERY, 'train' otherwise: a stable hash, the same on every machine."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % HPS_V2_EVAL_EVERY == 0 else "train"


def _hps_v2_files(folder):
    """style -> local path of `<style>.json`: from `folder`, or downloaded once into the hub cache."""
    names = ", ".join(f"{s}.json" for s in HPS_V2_STYLES)
    if folder:
        paths = {style: os.path.join(folder, f"{style}.json") for style in HPS_V2_STYLES}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise PromptError(f"HPSv2 benchmark folder {folder!r} lacks {', '.join(missing)} (it needs {names}).")
        return paths
    from huggingface_hub import hf_hub_download

    paths = {}
    for style in HPS_V2_STYLES:
        filename = f"benchmark/{style}.json"
        try:
            paths[style] = hf_hub_download(HPS_V2_REPO, filename, repo_type="dataset")
        except Exception as e:
            raise PromptError(
                f"Could not get {filename!r} from the hub dataset {HPS_V2_REPO!r} ({type(e).__name__}: {e}).\n"
                f"If this machine is offline, copy benchmark/{{{','.join(HPS_V2_STYLES)}}}.json of that dataset into "
                f"a folder and use config.prompt_fn='hps_v2_train:FOLDER', config.eval_prompt_fn='hps_v2_eval:FOLDER'."
            ) from e
    return paths


@functools.lru_cache(maxsize=4)
def hps_v2_benchmark(folder=None):
    """style -> tuple of the benchmark's prompts (read once per process)."""
    out = {}
    for style, path in _hps_v2_files(folder).items():
        prompts = _read_json_list(path, "HPSv2 benchmark file")
        if not all(isinstance(p, str) for p in prompts):
            raise PromptError(f"HPSv2 benchmark file {path!r} must be a JSON list of prompt strings.")
        out[style] = tuple(prompts)
    return out


def hps_v2(split, folder=None):
    """The `split` ('train'/'eval') prompts of the HPSv2 benchmark, styles interleaved, metadata {style}.

    Interleaving makes the first items of the eval set (those evaluation uses) cover every style.
    """
    per_style = []
    for style, prompts in hps_v2_benchmark(folder).items():
        kept = dict.fromkeys(p for p in prompts if p.strip() and hps_v2_split(p) == split)  # dedup, keep order
        per_style.append([(p, {"style": style}) for p in kept])
    items = [item for group in _round_robin(per_style) for item in group]
    name = f"hps_v2_{split}" + (f":{folder}" if folder else "")
    return PromptSet(name, tuple(items))


def _round_robin(lists):
    """[[a1, a2], [b1]] -> [[a1, b1], [a2]]: one element of each list in turn."""
    for i in range(max(map(len, lists), default=0)):
        yield [lst[i] for lst in lists if i < len(lst)]


@dataclasses.dataclass(frozen=True)
class Declared:
    """A registered prompt set: its factory, the metadata keys its items carry, and its path argument if any."""

    factory: object  # factory(argument) -> PromptSet; argument = the text after "name:" (None when absent)
    metadata: tuple = ()
    argument: str = None  # "PATH" (a file, required) or "FOLDER" (optional): a local path after "name:"


PROMPT_SETS = {
    "simple_animals": Declared(lambda arg: _from_list("simple_animals", SIMPLE_ANIMALS)),
    "eval_simple_animals": Declared(lambda arg: _from_list("eval_simple_animals", EVAL_SIMPLE_ANIMALS)),
    "counting": Declared(lambda arg: counting("counting", COUNTING_OBJECTS), ("object", "count")),
    "eval_counting": Declared(lambda arg: counting("eval_counting", EVAL_COUNTING_OBJECTS), ("object", "count")),
    "hps_v2_train": Declared(lambda arg: hps_v2("train", arg), ("style",), "FOLDER"),
    "hps_v2_eval": Declared(lambda arg: hps_v2("eval", arg), ("style",), "FOLDER"),
    "from_file": Declared(from_file, argument="PATH"),
}


def valid_names():
    names = [n for n in sorted(PROMPT_SETS) if PROMPT_SETS[n].argument != "PATH"]
    return names + [f"{n}:{d.argument}" for n, d in sorted(PROMPT_SETS.items()) if d.argument]


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """A prompt-set spec string (`config.prompt_fn`, `config.eval_prompt_fn`) parsed once."""

    name: str
    argument: str = None

    def build(self):
        return PROMPT_SETS[self.name].factory(self.argument)


def parse(text, key="prompt_fn"):
    """'name' or 'name:ARG' -> PromptSpec; a PromptError naming the key and the valid names otherwise."""
    name, sep, arg = text.partition(":") if isinstance(text, str) else (None, "", "")
    declared = PROMPT_SETS.get(name)
    if declared and ((not sep and declared.argument != "PATH") or (arg and declared.argument)):
        return PromptSpec(name, arg or None)
    raise PromptError(f"config.{key}={text!r} is not a prompt set; valid: {', '.join(valid_names())}.")


def problems(config):
    """Start-up checks of the prompt-set spec strings (reading them is `load`'s)."""
    out = []
    for key in ("prompt_fn", "eval_prompt_fn"):
        try:
            parse(config[key], key)
        except PromptError as e:
            out.append(str(e))
    return out


def make_prompt_set(text, key="prompt_fn"):
    return parse(text, key).build()


def load(config, key, reward_spec):
    """The prompt set of `config.<key>`, checked against the rewards of `reward_spec` (None: unchecked).

    Every item's metadata must suit the rewards (a prompt file is read here, once, at start-up).
    """
    spec = parse(config[key], key)
    try:
        prompt_set = spec.build()
    except PromptError as e:
        raise PromptError(f"config.{key}={config[key]!r}: {e}") from None
    for prompt, metadata in prompt_set.items if reward_spec is not None else ():
        problem = reward_spec.metadata_problem(metadata)
        if problem:
            givers = [n for n, d in PROMPT_SETS.items() if set(reward_spec.metadata()) <= set(d.metadata)]
            raise PromptError(
                f"config.{key}={config[key]!r}: prompt {prompt!r} {problem}, which config.reward_fn="
                f"{config.reward_fn!r} needs; use {' or '.join(givers)}, or a JSON prompt file with "
                f"{'/'.join(reward_spec.metadata())} keys"
            )
    return prompt_set
