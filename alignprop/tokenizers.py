"""Tokenizers built offline, and the one place prompts are tokenized (with the over-long prompt warning).

The CLIP tokenizer is the real one (49408 tokens), built from the BPE vocabulary file that open_clip_torch
ships inside its package; the T5 tokenizer is a tiny hand-written Unigram vocabulary (no package ships
T5's 32k sentencepiece model). Real checkpoints bring their own tokenizers; these serve the tiny and
random-weight models.
"""

import functools
import gzip
import logging
import os
import weakref

logger = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 49408
CLIP_BOS, CLIP_EOS = 49406, 49407


def _bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges():
    import importlib.util

    # Located without importing open_clip (whose import pulls in timm and torchvision).
    package = importlib.util.find_spec("open_clip")
    if package is None:
        raise ModuleNotFoundError("the offline CLIP tokenizer needs open_clip_torch (`pip install open_clip_torch`)")
    path = os.path.join(package.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a version header; CLIP uses merges 1..48894 (49152 - 256 - 2), as open_clip does.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return vocab, merges


def clip_tokenizer(pad_token=None):
    """The real CLIP tokenizer (49408 tokens, max length 77), built offline.

    `pad_token="!"` gives the padding of open_clip's tokenizers (id 0), as SD 2.x's tokenizer pads.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    extra = {"pad_token": pad_token} if pad_token else {}
    # model_max_length must be set: without it padding to max_length overflows.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CLIP_MAX_LENGTH, **extra)


def tiny_clip_text_config(max_positions=CLIP_MAX_LENGTH, pad_token_id=CLIP_EOS, hidden_act="quick_gelu"):
    """A tiny CLIP text tower over the real vocabulary, to pair with `clip_tokenizer` (text encoders and the
    reward models' text towers of the tiny configs)."""
    return dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=max_positions,
        bos_token_id=CLIP_BOS,
        eos_token_id=CLIP_EOS,
        pad_token_id=pad_token_id,
        hidden_act=hidden_act,
    )


# The tiny T5 vocabulary: special tokens first (pad 0, eos 1, unk 2, as T5's), then every printable ASCII
# character alone and word-initial ("▁x"), then whole words. Hand-written, so the ids are the same in every
# process (tokenizers' UnigramTrainer gives other ids on each run); every piece scores the same, so the
# segmentation with the fewest pieces wins (whole words when listed).
T5_SPECIAL = ("<pad>", "</s>", "<unk>")
T5_WORDS = (
    "a an the of in on at with and or to by for from is photo picture painting portrait drawing render image "
    "close up high quality detailed beautiful cute small big red blue green white black golden old young man "
    "woman child city street forest mountain river sea sky sunset night garden house room table tree flower "
    "cat dog owl bird horse cow sheep pig rabbit fox wolf bear lion tiger monkey elephant giraffe zebra deer "
    "mouse duck chicken fish frog snake turtle koala panda penguin dolphin whale butterfly bee branch"
).split()


@functools.lru_cache(maxsize=1)
def _t5_vocab():
    import string

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [*T5_SPECIAL, "▁", *chars, *("▁" + c for c in chars), *("▁" + w for w in T5_WORDS)]
    return tuple((piece, 0.0 if piece in T5_SPECIAL else -1.0) for piece in pieces)


def t5_tokenizer(model_max_length=512):
    """A tiny T5 tokenizer (T5TokenizerFast over a hand-written Unigram vocabulary), built offline: pad 0,
    eos 1 ("</s>" appended), unk 2, as T5's; for the tiny and random-weight T5 encoders."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=list(_t5_vocab()), extra_ids=0, model_max_length=model_max_length)


def token_ids(tokenizer, prompts, device, max_length=None):
    """Prompt strings -> input ids [B, max_length], padded and truncated as diffusers' pipelines do
    (`max_length` default: the tokenizer's; T5 is padded to the pipeline's `max_sequence_length`).

    The first truncation of a run is logged (one warning per tokenizer, with the number of dropped tokens).
    """
    prompts = list(prompts)
    max_length = max_length or tokenizer.model_max_length
    _report_truncation(tokenizer, prompts, max_length)
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


# Tokenizers that have reported a truncated prompt: one warning per run (one tokenizer), not one per batch.
_TRUNCATION_REPORTED = weakref.WeakSet()


def _report_truncation(tokenizer, prompts, limit):
    """Log once per tokenizer how many tokens the longest over-long prompt of the first such batch loses."""
    if tokenizer in _TRUNCATION_REPORTED:
        return
    # verbose=False: no transformers warning of its own about the length (it would come with no count).
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False).input_ids]
    over = [(n - limit, prompt) for n, prompt in zip(lengths, prompts) if n > limit]
    if not over:
        return
    _TRUNCATION_REPORTED.add(tokenizer)
    dropped, prompt = max(over, key=lambda item: item[0])
    shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    logger.warning(
        "Prompt %r is %d tokens long, over the text encoder's limit of %d (start and end tokens included): "
        "its last %d tokens are dropped (%d prompt(s) of this batch are truncated). Later over-long prompts "
        "are truncated the same way without another warning.",
        shown,
        dropped + limit,
        limit,
        dropped,
        len(over),
    )


# A tiny WordPiece vocabulary (special tokens, lower-case letters, digits, punctuation) for the tiny BERT-style
# text towers (ImageReward's); real checkpoints bring `bert-base-uncased`'s tokenizer.
_TINY_WORDPIECE = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
                   + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"])


def tiny_bert_tokenizer():
    """A BERT (WordPiece, lower-case) tokenizer over a tiny character vocabulary, built offline."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={token: i for i, token in enumerate(_TINY_WORDPIECE)}, model_max_length=512)


def tiny_byte_bpe_tokenizer(corpus, special_tokens, vocab_size=1000, pad_token=None):
    """A byte-level BPE tokenizer (GPT-2 / Qwen2 style, no BOS) trained in-process on `corpus` (strings) up to
    `vocab_size` tokens, then `special_tokens` appended as atomic tokens; for the tiny Qwen2-VL of HPSv3.

    tokenizers' BPE trainer breaks ties by the pair itself, so the same corpus gives the same ids in every process.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    if pad_token:
        tokenizer.pad_token = pad_token
    return tokenizer
