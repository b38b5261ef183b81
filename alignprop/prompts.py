"""Prompt sets: a registry of names -> `PromptSet`, whose `__call__(rng)` returns `(prompt, metadata)`."""

import dataclasses
import random

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

FILE_PREFIX = "from_file:"


class PromptError(ValueError):
    pass


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


def from_file(path):
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
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


PROMPT_SETS = {
    "simple_animals": lambda: _from_list("simple_animals", SIMPLE_ANIMALS),
    "eval_simple_animals": lambda: _from_list("eval_simple_animals", EVAL_SIMPLE_ANIMALS),
}


def valid_names():
    return sorted(PROMPT_SETS) + [FILE_PREFIX + "PATH"]


def check_name(name, key="prompt_fn"):
    """Raise a PromptError naming the config key unless `name` is a registered set or a file spec."""
    if name in PROMPT_SETS or (name.startswith(FILE_PREFIX) and len(name) > len(FILE_PREFIX)):
        return
    raise PromptError(f"config.{key}={name!r} is not a prompt set; valid: {', '.join(valid_names())}.")


def make_prompt_set(name, key="prompt_fn"):
    check_name(name, key)
    if name.startswith(FILE_PREFIX):
        return from_file(name[len(FILE_PREFIX):])
    return PROMPT_SETS[name]()
