"""FIM prompt formats, family detection, stop ids and post-processing rules.

Also the home of :func:`fim_tokenizer`, which test_ar*.py imports: the real Qwen2.5-Coder
tokenizer from ../shared, and small byte-level BPE tokenizers built here with DeepSeek-Coder's and
StarCoder2's special tokens laid out as in their checkpoints (no weights or network needed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dinfill.sampler.fim import (
    FIM_FORMATS,
    build_fim_prompts,
    cut_at_stop,
    detect_family,
    fim_tokens,
    first_line,
    postprocess,
    resolve_family,
)

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
QWEN_DIR = SHARED / "tokenizers" / "qwen2.5-coder"

DS_BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
DS_EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
# DeepSeek-Coder appends its specials after the BPE vocabulary (ids 32013...), StarCoder2 puts them first.
DS_HOLE, DS_BEGIN, DS_END = "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581end\uff5c>"
DS_SPECIALS = [DS_BOS, DS_EOS, DS_HOLE, DS_BEGIN, DS_END, "<pad>"]
SC2_SPECIALS = [
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>", "<file_sep>",
]  # fmt: skip

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * 2)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n",
    "    def push(self, x):\n        self.items.append(x)\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    main(sys.argv[1:])\n",
    'def is_prime(n: int) -> bool:\n    """Return True if n is prime."""\n    if n < 2:\n        return False\n',
    "    while left < right:\n        mid = (left + right) // 2\n",
] * 3

PAIRS = [
    ("def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"),
    ("for i in range(10):\n", "    print(i)\n"),
    ("class Stack:\n    def push(self, x):\n        self.items.", "\n"),
]


def _bpe_tokenizer(specials_first: list[str], specials_after: list[str], bos: str | None, eos: str, pad: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials_first,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(specials_after)
    if bos is not None:  # DeepSeek's tokenizer prepends BOS to everything it encodes
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)


def fim_tokenizer(family: str, tmp_dir: Path):
    """A tokenizer with ``family``'s FIM tokens, saved and re-loaded through ``AutoTokenizer``.

    ``qwen2`` is the real Qwen2.5-Coder tokenizer (skips when ../shared is absent), ``llama`` a
    DeepSeek-Coder-like one, ``starcoder2`` a StarCoder2-like one; ``plain`` has no FIM tokens.
    """
    from transformers import AutoTokenizer

    if family == "qwen2":
        if not (QWEN_DIR / "tokenizer.json").is_file():
            pytest.skip(f"{QWEN_DIR} not found: the real Qwen2.5-Coder tokenizer must sit in ../shared beside the repo")
        return AutoTokenizer.from_pretrained(str(QWEN_DIR))
    if family == "llama":
        tok = _bpe_tokenizer([], DS_SPECIALS, bos=DS_BOS, eos=DS_EOS, pad=DS_EOS)
    elif family == "starcoder2":
        tok = _bpe_tokenizer(SC2_SPECIALS, [], bos=None, eos="<|endoftext|>", pad="<|endoftext|>")
    elif family == "plain":
        tok = _bpe_tokenizer(["<|endoftext|>"], [], bos=None, eos="<|endoftext|>", pad="<|endoftext|>")
    else:
        raise ValueError(family)
    path = tmp_dir / f"tok-{family}"
    tok.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    return {f: fim_tokenizer(f, tmp) for f in ("qwen2", "llama", "starcoder2", "plain")}


EXPECTED_FAMILY = {"qwen2": "qwen2.5-coder", "llama": "deepseek-coder", "starcoder2": "starcoder2"}


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "starcoder2"])
def test_family_detected_from_special_tokens(tokenizers, model_type):
    tok = tokenizers[model_type]
    family = EXPECTED_FAMILY[model_type]
    assert detect_family(tok) == family
    assert detect_family(tok, model_type="qwen2") == family  # the tokenizer wins over a model_type hint
    assert resolve_family(family.split("-")[0].upper()) == family
    assert fim_tokens(tok, family=family.split("-")[0]) == fim_tokens(tok)  # an explicit family (alias) agrees


def test_qwen_ids_match_the_real_tokenizer(tokenizers):
    t = fim_tokens(tokenizers["qwen2"])
    assert (t.prefix_id, t.suffix_id, t.middle_id) == (151659, 151661, 151660)
    # eos <|endoftext|>, then <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|> <|repo_name|> <|file_sep|>
    # <|im_end|>: the eight ids of Qwen2.5-Coder's own FIM example (examples/Qwen2.5-Coder-fim.py)
    assert t.stop_ids == (151643, 151659, 151660, 151661, 151662, 151663, 151664, 151645)
    assert t.lead_ids == ()


def test_deepseek_and_starcoder2_stop_and_lead_ids(tokenizers):
    ds = fim_tokens(tokenizers["llama"])
    vocab = tokenizers["llama"].get_vocab()
    # eos and the three FIM sentinels (this tokenizer has no <|EOT|>, so it is skipped)
    assert ds.stop_ids == (vocab[DS_EOS], vocab[DS_BEGIN], vocab[DS_HOLE], vocab[DS_END])
    assert ds.lead_ids == (vocab[DS_BOS],)  # BOS starts the prompt, as DeepSeek's own examples do
    assert (ds.prefix_id, ds.suffix_id, ds.middle_id) == (vocab[DS_BEGIN], vocab[DS_HOLE], vocab[DS_END])
    sc = fim_tokens(tokenizers["starcoder2"])
    assert (sc.prefix_id, sc.middle_id, sc.suffix_id) == (1, 2, 3)
    # <|endoftext|> <file_sep> (bigcode-evaluation-harness), then the FIM sentinels, <fim_pad>, <repo_name>
    assert sc.stop_ids == (0, 6, 1, 2, 3, 4, 5) and sc.lead_ids == ()


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "starcoder2"])
def test_prompt_layout_and_string_equivalence(tokenizers, model_type):
    tok = tokenizers[model_type]
    t = fim_tokens(tok)
    fmt = FIM_FORMATS[t.family]
    prompts = build_fim_prompts(tok, [p for p, _ in PAIRS], [s for _, s in PAIRS], t)
    for (prefix, suffix), ids in zip(PAIRS, prompts, strict=True):
        pre = tok(prefix, add_special_tokens=False)["input_ids"]
        suf = tok(suffix, add_special_tokens=False)["input_ids"]
        lead = list(t.lead_ids)
        assert ids == lead + [t.prefix_id] + pre + [t.suffix_id] + suf + [t.middle_id]
        # same ids as tokenizing the published prompt string with the tokenizer's special-token parsing
        text = f"{fmt.prefix}{prefix}{fmt.suffix}{suffix}{fmt.middle}"
        assert ids == tok(text, add_special_tokens=True)["input_ids"]


def test_tokenizer_without_fim_tokens(tokenizers):
    plain = tokenizers["plain"]
    with pytest.raises(ValueError, match="no FIM tokens of family 'starcoder2'.*<fim_prefix>"):
        detect_family(plain, model_type="starcoder2")
    with pytest.raises(ValueError, match="none of the supported families"):
        detect_family(plain)
    with pytest.raises(ValueError, match="no FIM tokens of family 'deepseek-coder'"):
        fim_tokens(tokenizers["qwen2"], family="deepseek")
    with pytest.raises(ValueError, match="unknown FIM family 'gpt2'"):
        fim_tokens(plain, family="gpt2")


def test_bad_prompt_lists(tokenizers):
    tok = tokenizers["starcoder2"]
    t = fim_tokens(tok)
    with pytest.raises(ValueError, match="2 prefixes but 1 suffixes"):
        build_fim_prompts(tok, ["a", "b"], ["c"], t)
    with pytest.raises(ValueError, match="lists of strings"):
        build_fim_prompts(tok, "a", "b", t)
    with pytest.raises(ValueError, match="at least one"):
        build_fim_prompts(tok, [], [], t)
    with pytest.raises(ValueError, match="pair 0"):
        build_fim_prompts(tok, [None], ["x"], t)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("return a + b\n    print(x)", "return a + b"),
        ("\n    return a\nfoo", "    return a"),  # leading newline: the second line
        (" \nx = 1\ny", "x = 1"),
        ("\n", ""),
        ("", ""),
        ("no newline", "no newline"),
        ("  \nkept", "  "),  # only "\n" and " \n" count as an empty first line
    ],
)
def test_first_line_rule(text, want):
    assert first_line(text) == want
    assert postprocess(text, "first_line") == want


def test_stop_sequences_and_none_rules():
    text = "x = 1\ndef f():\n    pass\nclass A: pass"
    assert postprocess(text, "none") == text
    assert postprocess(text, "stop_sequences", ["\nclass", "\ndef"]) == "x = 1"  # earliest wins, not first listed
    assert postprocess(text, "stop_sequences", ["\nif"]) == text
    assert cut_at_stop("abcabc", ["c"]) == ("ab", True)
    assert cut_at_stop("abc", ["z"]) == ("abc", False)
    with pytest.raises(ValueError, match="at least one stop sequence"):
        postprocess(text, "stop_sequences")
    with pytest.raises(ValueError, match="non-empty strings"):
        postprocess(text, "stop_sequences", [""])
    with pytest.raises(ValueError, match="list of strings"):
        postprocess(text, "stop_sequences", "\n")
    with pytest.raises(ValueError, match="unknown post-processing rule 'whole'"):
        postprocess(text, "whole")
