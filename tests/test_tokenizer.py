"""o200k_harmony built from tokenizer.json or o200k_base.tiktoken equals tiktoken's encoding."""

import inspect
import json
import random

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from gptoss_mlx.tokenizer import (
    O200K_PATTERN, SPECIAL_TOKENS, TokenizerError, harmony_special_tokens, load_tokenizer,
)


def varied_text(size=300_000, seed=0) -> str:
    """A few hundred KB: Python source, prose, many scripts, emoji, numbers, odd whitespace."""
    rng = random.Random(seed)
    import argparse, email, json as json_mod, textwrap  # noqa: E401 - sources as sample text
    parts = [inspect.getsource(m) for m in (argparse, email, json_mod, textwrap)]
    alphabets = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "αβγδεζηθικλμνξοπρστυφχψω",
        "абвгдеёжзийклмнопрстуфхцчшщъыьэюя", "日本語の文章と漢字カタカナ", "中文字符测试数据",
        "한국어텍스트", "العربيةنص", "עברית", "हिन्दी", "ไทย", "🙂🚀👍🏽👩‍💻🇫🇷",
        "0123456789", " \t\n\r", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "éèêëàâäôöûüçñ",
        "\u200b\u00a0\ufeff", "'s 're 've 'll 'd 't 'm 'S 'LL",
    ]
    out_len = sum(map(len, parts))
    while out_len < size:
        alphabet = rng.choice(alphabets)
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        parts.append(word + rng.choice([" ", "  ", "\n", "\n\n", "", "\t", ". ", ", "]))
        out_len += len(parts[-1])
    parts.append("<|start|>user<|message|>hi<|end|> <|endoftext|> <|reserved_200013|>")
    return "".join(parts)


@pytest.fixture(scope="module")
def reference(tiktoken_file):
    return tiktoken.Encoding(
        name="o200k_harmony_reference", pat_str=O200K_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(tiktoken_file)),
        special_tokens=harmony_special_tokens(),
    )


@pytest.fixture(scope="module")
def from_json(tokenizer_json):
    return load_tokenizer(tokenizer_json)


def test_tokenizer_json_matches_tiktoken_on_varied_text(reference, from_json):
    text = varied_text()
    assert len(text.encode()) > 300_000
    ids = from_json.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert from_json.decode(ids) == text


def test_tiktoken_file_gives_the_same_encoding(tiktoken_file, from_json):
    enc = load_tokenizer(tiktoken_file)
    text = varied_text(20_000, seed=3)
    assert enc.encode(text) == from_json.encode(text)


def test_special_ids(from_json):
    for name, i in SPECIAL_TOKENS.items():
        assert from_json.encode(name, allowed_special="all") == [i]
        assert from_json.decode([i]) == name
    assert from_json.special("call") == 200012
    assert from_json.n_vocab == 201088
    assert from_json.decode([201087]) == "<|reserved_201087|>"
    assert from_json.encode("assistant") == [173781]


def test_special_looking_text_is_ordinary_text(from_json):
    ids = from_json.encode("<|start|>assistant<|channel|>")
    assert not set(ids) & set(SPECIAL_TOKENS.values())
    assert from_json.decode(ids) == "<|start|>assistant<|channel|>"


def test_tokenizer_from_env(monkeypatch, tiktoken_file, tmp_path):
    monkeypatch.setenv("GPTOSS_MLX_TIKTOKEN_FILE", str(tiktoken_file))
    assert load_tokenizer().encode("hello world") == [24912, 2375]
    monkeypatch.delenv("GPTOSS_MLX_TIKTOKEN_FILE")
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tiktoken_file.parent))
    assert load_tokenizer().encode("hello") == [24912]


def test_no_vocabulary_anywhere(monkeypatch, tmp_path):
    for var in ("GPTOSS_MLX_TIKTOKEN_FILE", "TIKTOKEN_ENCODINGS_BASE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    with pytest.raises(TokenizerError, match="GPTOSS_MLX_TIKTOKEN_FILE"):
        load_tokenizer()


def test_corrupt_tiktoken_file(tmp_path):
    bad = tmp_path / "o200k_base.tiktoken"
    bad.write_text("aGVsbG8= 0\n")
    with pytest.raises(TokenizerError, match="sha256 does not match"):
        load_tokenizer(bad)


@pytest.mark.parametrize("path", [123, b"/tmp", ["tokenizer.json"]])
def test_a_path_that_is_no_path_is_named(path):
    """load_tokenizer(123) was os.fspath's TypeError from inside pathlib."""
    with pytest.raises(TypeError, match=f"load_tokenizer takes a path .*got {type(path).__name__}"):
        load_tokenizer(path)


def test_broken_tokenizer_json(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"model": {}}))
    with pytest.raises(TokenizerError, match="tokenizer.json: model.vocab must be a JSON object"):
        load_tokenizer(tmp_path)


def test_a_directory_named_like_the_tokenizer_file_is_said_to_be_one(tmp_path):
    """A tester's (helper-131): it read "no tokenizer.json or o200k_base.tiktoken in this directory"."""
    (tmp_path / "tokenizer.json").mkdir()
    with pytest.raises(TokenizerError, match=r"tokenizer.json: is a directory, not a tokenizer file"):
        load_tokenizer(tmp_path)


def test_malformed_tiktoken_lines_name_the_line(tmp_path):
    from gptoss_mlx.tokenizer import ranks_from_tiktoken_file
    bad = tmp_path / "o200k_base.tiktoken"
    bad.write_text("aGVsbG8= 0\nnot-base64!! 1\n")
    with pytest.raises(TokenizerError, match="line 2 is not 'base64-token rank'"):
        ranks_from_tiktoken_file(bad, check_hash=False)


@pytest.mark.parametrize("token", ["hello world", "tab\there", "\x7f", "caf\u00e9\u4e00"])
def test_a_vocabulary_token_that_is_not_byte_level_is_named(tmp_path, token):
    """Byte-level BPE writes each byte as one of 256 stand-in characters: a space, a control
    character or any other character in a token is not one of them."""
    from gptoss_mlx.tokenizer import ranks_from_tokenizer_json

    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"model": {"vocab": {"hi": 0, token: 1}}}))
    with pytest.raises(TokenizerError, match="is not byte-level BPE"):
        ranks_from_tokenizer_json(bad)


def test_an_added_token_whose_content_is_not_a_string_is_named(tmp_path):
    """It was a TypeError traceback (unhashable type: 'list') from the CLI."""
    bad = tmp_path / "tokenizer.json"
    for content in ([1], {"a": 1}):
        bad.write_text(json.dumps({"model": {"vocab": {"hi": 0}}, "added_tokens": [{"id": 200006, "content": content}]}))
        with pytest.raises(TokenizerError, match="an added token's content must be a string"):
            load_tokenizer(tmp_path)


def test_a_small_gzip_that_unpacks_to_gigabytes_is_refused_unpacked(tmp_path, monkeypatch):
    """The 256 MB limit was checked on the compressed size: a 1 MB tokenizer.json.gz took 3.2 GB."""
    import gzip

    import gptoss_mlx.files as files

    monkeypatch.setattr(files, "MAX_JSON_BYTES", 1 << 20)
    bomb = tmp_path / "tokenizer.json.gz"
    bomb.write_bytes(gzip.compress(b"{" + b" " * (4 << 20) + b"}"))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(TokenizerError, match="unpacks to more than 1048576 bytes, too large for a JSON file"):
        load_tokenizer(bomb)


def test_a_tokenizer_replaced_while_it_is_read_is_never_filed_under_the_other_bytes(tokenizer_json, tmp_path,
                                                                                      monkeypatch):
    """The file was hashed, then read again to parse it: replaced in between (a download, a
    copy), the other file's vocabulary was kept under these bytes for the rest of the process."""
    import gzip

    import gptoss_mlx.tokenizer as tokenizer

    raw = tokenizer_json.read_bytes()
    text = gzip.decompress(raw) if tokenizer_json.suffix == ".gz" else raw
    data = json.loads(text)
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "."}}]}
    path = tmp_path / "tokenizer.json"
    path.write_bytes(text)
    parse = tokenizer.ranks_from_tokenizer_json

    def replaced_while_read(where, raw=None):  # another process writes the file meanwhile
        path.write_text(json.dumps(data))
        return parse(where, raw)

    monkeypatch.setattr(tokenizer, "ranks_from_tokenizer_json", replaced_while_read)
    first = load_tokenizer(path)  # the bytes it read: o200k's own split
    monkeypatch.setattr(tokenizer, "ranks_from_tokenizer_json", parse)
    path.write_bytes(text)
    assert load_tokenizer(path).encode("hello world") == first.encode("hello world") == [24912, 2375]
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match=r"its split regex \(pre_tokenizer\) is not o200k's"):
        load_tokenizer(path)  # the other file's bytes: parsed, not the first's encoding


def test_a_gzip_of_many_members_is_refused_in_good_time(tmp_path):
    """20,000 empty gzip members after the tokenizer took 11 s (200,000: over a minute)."""
    import gzip

    path = tmp_path / "tokenizer.json.gz"
    path.write_bytes(gzip.compress(b'{"model": {"vocab": {}}}') + gzip.compress(b"") * 20_000)
    with pytest.raises(TokenizerError, match="more than 64 gzip members"):
        load_tokenizer(path)


def test_a_tokenizer_json_whose_ids_are_not_o200k_base_is_refused(tokenizer_json, tmp_path):
    """Two ids swapped loaded and generated without a word (an o200k_base.tiktoken file is
    checked against o200k_base's sha256; a tokenizer.json was not)."""
    import gzip

    raw = tokenizer_json.read_bytes()
    data = json.loads(gzip.decompress(raw) if tokenizer_json.suffix == ".gz" else raw)
    vocab = data["model"]["vocab"]
    a, b = (token for token, rank in vocab.items() if rank in (1000, 1001))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="the vocabulary is not o200k_base's .* a token's id was changed"):
        load_tokenizer(tmp_path)


def test_the_same_tokenizer_file_is_parsed_once(tokenizer_json, tmp_path):
    """A second load of the same bytes (a checkpoint loaded again, or its copy) reuses the parsed
    encoding; other bytes under the same name are parsed again."""
    import gzip

    first = load_tokenizer(tokenizer_json)
    copy = tmp_path / "tokenizer.json"
    raw = tokenizer_json.read_bytes()
    copy.write_bytes(gzip.decompress(raw) if tokenizer_json.suffix == ".gz" else raw)
    again = load_tokenizer(copy)
    assert load_tokenizer(tmp_path) is again and load_tokenizer(tokenizer_json) is first
    copy.write_bytes(copy.read_bytes()[:-2])  # cut short
    with pytest.raises(TokenizerError, match="tokenizer.json: not valid JSON"):
        load_tokenizer(copy)
