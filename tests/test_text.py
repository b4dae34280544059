"""Prompt sets (data/prompts.py) and the prompt-embedding job (text.py).

The embedding tests build tiny random text encoders and tokenizers offline (a CLIP BPE
vocabulary written here, a T5 sentencepiece model trained here on the prompts), save them with
`save_pretrained`, run the `embed_prompts` job on the folders, and compare every stored
embedding with diffusers' own `StableDiffusion3Pipeline.encode_prompt` /
`FluxPipeline.encode_prompt` on the in-memory encoders.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from normguard_jax.data import prompts as P

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_LENGTH = 12      # tiny CLIP model_max_length: relation prompts are truncated, as in diffusers
T5_LENGTH = 16        # max_sequence_length of the tests


# --------------------------------------------------------------------------- prompt sets.

_OBJECT = r"(a|two|three|four) (\w+) (\w+)"


def _parse(text):
    """An independent reading of a compositional prompt's text into its metadata."""
    def obj(count, colour, noun):
        count = ("a", "two", "three", "four").index(count) + 1
        singular = {v: k for k, v in P.PLURALS.items()}.get(noun, noun)
        assert (noun == singular) == (count == 1), text
        return count, P.COLOURS.index(colour), P.SHAPES.index(singular)

    m = re.fullmatch(_OBJECT, text)
    if m:
        return dict(kind=0, count=obj(*m.groups())[0], colour=obj(*m.groups())[1],
                    shape=obj(*m.groups())[2], position=-1, count_2=0, colour_2=-1, shape_2=-1)
    m = re.fullmatch(_OBJECT + r" (and|to the left of|to the right of|above|below) " + _OBJECT,
                     text)
    assert m, text
    first, link, second = obj(*m.groups()[:3]), m.group(4), obj(*m.groups()[4:])
    return dict(kind=1 if link == "and" else 2, count=first[0], colour=first[1], shape=first[2],
                position=-1 if link == "and" else P.POSITIONS.index(link), count_2=second[0],
                colour_2=second[1], shape_2=second[2])


def test_compositional_prompts_deterministic_disjoint_and_metadata_matches_text():
    a, b = P.compositional_prompts(), P.compositional_prompts()
    assert a == b
    assert (len(a.train), len(a.test)) == (352, 88)
    train, test = {p.text for p in a.train}, {p.text for p in a.test}
    assert len(train) == 352 and len(test) == 88 and not train & test
    for prompt in a.train + a.test:
        assert prompt.metadata() == _parse(prompt.text), prompt
    # Every kind is in both splits; colours and shapes are those of the shapes dataset.
    for split in (a.train, a.test):
        assert {p.kind for p in split} == {0, 1, 2}
        assert {p.position for p in split if p.kind == 2} == {0, 1, 2, 3}
    assert P.COLOURS == ("red", "green", "blue", "yellow")


def test_prompt_file_reader(tmp_path):
    lines = [f"prompt number {i}" for i in range(40)]
    path = tmp_path / "mine.txt"
    path.write_text("\n".join(lines[:20] + ["", "  ", lines[3]] + lines[20:]) + "\n")
    s = P.read_prompt_file(path, test_fraction=0.25)
    assert s.name == "mine" and (len(s.train), len(s.test)) == (30, 10)
    texts = [p.text for p in s.train] + [p.text for p in s.test]
    assert sorted(texts) == sorted(lines)                   # blanks and the repeat dropped
    assert [p.text for p in s.train] == [t for t in lines if t in {p.text for p in s.train}]
    assert all(p.metadata() == dict.fromkeys(P.METADATA_FIELDS, -1) for p in s.train)
    assert P.read_prompt_file(path, 0.25) == s and P.read_prompt_file(path, 0.25, seed=1) != s
    with pytest.raises(FileNotFoundError):
        P.read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no prompt"):
        P.read_prompt_file(tmp_path / "blank.txt")


def test_prompts_tfds_builder_offline(tmp_path):
    builder = P.prepare_prompts(tmp_path / "tfds")
    expected = P.compositional_prompts()
    for split in P.SPLITS:
        assert P.load_prompts(builder, split) == expected.split(split)
    assert P.prepare_prompts(tmp_path / "tfds").info.splits["test"].num_examples == 88  # reuse
    path = tmp_path / "mine.txt"
    path.write_text("".join(f"my prompt {i}\n" for i in range(10)))
    builder = P.prepare_prompts(tmp_path / "tfds", P.file_config(path, test_fraction=0.3))
    mine = P.read_prompt_file(path, 0.3)
    assert P.load_prompts(builder, "train") == mine.train
    assert P.load_prompts(builder, "test") == mine.test and len(mine.test) == 3


def test_training_path_never_imports_torch_or_transformers():
    code = ("import sys, normguard_jax.rl, normguard_jax.pretrain, normguard_jax.text, "
            "normguard_jax.data\n"
            "bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_embed_prompts_job_is_registered_and_config_documented():
    from normguard_jax import main
    from conftest import load_config_file
    assert main.JOBS["embed_prompts"] == "normguard_jax.text"
    for family in ("sd3", "flux"):
        config = load_config_file("embed_prompts.py", family)
        assert config.job == "embed_prompts" and config.family == family
    source = open(os.path.join(REPO, "configs", "embed_prompts.py")).read()
    for line in source.splitlines():
        if re.match(r"\s+c\.\w+ = ", line):
            assert "#" in line, line


# --------------------------------------------------------------------------- tiny encoders.

_WORDS = ("red", "green", "blue", "yellow", "circle", "square", "triangle", "cross", "a", "two")


def _clip_tokenizer(pad_token):
    """A CLIP BPE tokenizer: letters, word-final letters, and merges that build some words
    whole (the others stay letters, so long prompts get truncated)."""
    from transformers import CLIPTokenizer
    vocab, merges = {}, []
    for c in "abcdefghijklmnopqrstuvwxyz!":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token,
                         model_max_length=CLIP_LENGTH)


def _t5_tokenizer(tmp_path, texts):
    """A T5 tokenizer from a sentencepiece unigram model trained here on `texts`."""
    import sentencepiece as spm
    from transformers import T5Tokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "spiece"), vocab_size=40,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=3, model_max_length=512)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Tiny random CLIP-L, CLIP-G (different sizes and pad tokens, as in SD3) and T5, saved
    with their tokenizers into folders; returns (folders, in-memory objects)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error()   # its truncation warnings list every prompt
    pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("encoders")
    torch.set_num_threads(1)  # tiny matrices: threads only add contention on a shared CPU
    torch.manual_seed(0)
    objects, folders = {}, {}
    for name, width, projection, pad in (("clip_l", 32, 16, "<|endoftext|>"),
                                         ("clip_g", 40, 24, "!")):
        tokenizer = _clip_tokenizer(pad)
        config = transformers.CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=CLIP_LENGTH,
            projection_dim=projection, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        objects[name] = (tokenizer, transformers.CLIPTextModelWithProjection(config).eval())
    texts = [p.text for p in P.compositional_prompts().train]
    t5_tokenizer = _t5_tokenizer(root, texts)
    t5_config = transformers.T5Config(
        vocab_size=len(t5_tokenizer), d_model=80, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    objects["t5"] = (t5_tokenizer, transformers.T5EncoderModel(t5_config).eval())
    for name, (tokenizer, model) in objects.items():
        folders[name] = str(root / name)
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders, objects


def _config(family, folders, **overrides):
    from conftest import load_config_file
    config = load_config_file("embed_prompts.py", family)
    config.unlock()
    for name in ("clip_l", "clip_g", "t5"):
        config[name] = folders[name] if (family == "sd3" or name != "clip_g") else ""
    config.max_sequence_length = T5_LENGTH
    config.batch_size = 512
    config.update(overrides)
    return config


def _errors(stored, reference):
    reference = np.asarray(reference, np.float64)
    diff = np.abs(np.asarray(stored, np.float64) - reference)
    return diff.max(), diff.max() / np.abs(reference).max()


def _check(train, test, empty, text, pooled, empty_text, empty_pooled, family):
    stored_text = np.concatenate([train.text, test.text, empty.text])
    stored_pooled = np.concatenate([train.pooled, test.pooled, empty.pooled])
    text = np.concatenate([text, empty_text])
    pooled = np.concatenate([pooled, empty_pooled])
    assert stored_text.shape == text.shape and stored_pooled.shape == pooled.shape
    (ta, tr), (pa, pr) = _errors(stored_text, text), _errors(stored_pooled, pooled)
    print(f"{family}: text {text.shape[1:]} max abs {ta:.2e} rel {tr:.2e}; "
          f"pooled {pooled.shape[1:]} max abs {pa:.2e} rel {pr:.2e}")
    np.testing.assert_allclose(stored_text, text, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stored_pooled, pooled, rtol=1e-5, atol=1e-5)


def test_sd3_embeddings_equal_diffusers_encode_prompt(encoders, tmp_path):
    import torch
    from diffusers import StableDiffusion3Pipeline
    from normguard_jax import text as text_lib
    folders, objects = encoders
    workdir = str(tmp_path / "work")
    assert text_lib.run(_config("sd3", folders), workdir) == os.path.join(workdir, "embeddings")
    assert not [n for n in os.listdir(workdir) if n.startswith(".embeddings.partial")]
    train, test, empty = (text_lib.load_embeddings(workdir, s) for s in ("train", "test", "empty"))
    prompt_set = P.compositional_prompts()
    assert train.prompts == prompt_set.train and test.prompts == prompt_set.test
    assert empty.prompts == (P.Prompt(text=""),)
    assert train.text.shape == (352, CLIP_LENGTH + T5_LENGTH, 80)
    assert train.pooled.shape == (352, 40)

    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=objects["clip_l"][1], tokenizer=objects["clip_l"][0],
        text_encoder_2=objects["clip_g"][1], tokenizer_2=objects["clip_g"][0],
        text_encoder_3=objects["t5"][1], tokenizer_3=objects["t5"][0])
    texts = [p.text for p in prompt_set.train + prompt_set.test]
    with torch.no_grad():
        text, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=texts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True,
            max_sequence_length=T5_LENGTH)
    # The empty record is what the pipeline uses for the default negative prompt "".
    _check(train, test, empty, text.numpy(), pooled.numpy(), negative[:1].numpy(),
           negative_pooled[:1].numpy(), "sd3")
    cond = train.condition([0, 5])
    assert cond["text"].shape == (2, CLIP_LENGTH + T5_LENGTH, 80)
    null = text_lib.null_condition(workdir)
    np.testing.assert_array_equal(null["pooled"], empty.pooled[0])


def test_flux_embeddings_from_a_prompt_file_equal_diffusers(encoders, tmp_path):
    import torch
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel
    from normguard_jax import text as text_lib
    folders, objects = encoders
    path = tmp_path / "mine.txt"
    lines = ["a cat", "two dogs on a red sofa", "a blue square above a green circle",
             "a very long prompt that the tiny encoders must truncate " * 3] + [
                 f"prompt {i} with yellow crosses" for i in range(8)]
    path.write_text("\n".join(lines))
    workdir = str(tmp_path / "work")
    text_lib.run(_config("flux", folders, prompts=str(path), test_fraction=0.25, batch_size=5),
                 workdir)
    train, test, empty = (text_lib.load_embeddings(workdir, s) for s in ("train", "test", "empty"))
    mine = P.read_prompt_file(path, 0.25)
    assert train.prompts == mine.train and test.prompts == mine.test
    assert train.text.shape == (9, T5_LENGTH, 80) and train.pooled.shape == (9, 32)

    clip = CLIPTextModel.from_pretrained(folders["clip_l"]).eval()  # FLUX's CLIP: no projection
    pipe = FluxPipeline(scheduler=None, vae=None, transformer=None, text_encoder=clip,
                        tokenizer=objects["clip_l"][0], text_encoder_2=objects["t5"][1],
                        tokenizer_2=objects["t5"][0])
    texts = [p.text for p in mine.train + mine.test]
    with torch.no_grad():
        text, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None,
                                             max_sequence_length=T5_LENGTH)
        empty_text, empty_pooled, _ = pipe.encode_prompt(prompt=[""], prompt_2=None,
                                                         max_sequence_length=T5_LENGTH)
    _check(train, test, empty, text.numpy(), pooled.numpy(), empty_text.numpy(),
           empty_pooled.numpy(), "flux")

    # bfloat16 encoders and float16 storage: close to the float32 numbers.
    low = text_lib.run(_config("flux", folders, prompts=str(path), test_fraction=0.25,
                               dtype="bfloat16", store_dtype="float16"), str(tmp_path / "low"))
    assert text_lib.read_meta(low)["store_dtype"] == "float16"
    half = text_lib.load_embeddings(low, "train")
    assert half.text.dtype == np.float32 and half.prompts == train.prompts
    for a, b in ((half.text, train.text), (half.pooled, train.pooled)):
        assert 0 < np.abs(a - b).max() < 0.05 * np.abs(b).max()


def _fake_folders(root):
    """Folders that pass the job's checks (config.json, tokenizer files) without any model."""
    folders = {}
    for name in ("clip_l", "clip_g", "t5"):
        folders[name] = str(root / name)
        os.makedirs(folders[name])
        for file in ("config.json", "tokenizer_config.json"):
            (root / name / file).write_text("{}")
    return folders


def test_embed_job_is_atomic_resumes_and_refuses_other_requests(tmp_path, monkeypatch):
    """The job's bookkeeping, with a fake encoder (no torch): an interrupted run leaves no
    dataset and its leftovers are removed, a finished run is not redone, another request is
    refused, bad fields and missing folders are named."""
    from normguard_jax import text as text_lib
    from normguard_jax.config_checks import ConfigError
    calls = []

    def fake_encode(encoders, family, texts, max_sequence_length):
        calls.append(list(texts))
        if encoders == "fail" and len(calls) > 2:
            raise KeyboardInterrupt
        codes = np.array([[len(t), sum(map(ord, t))] for t in texts], np.float32)
        return np.repeat(codes[:, None, :], max_sequence_length, 1), codes

    monkeypatch.setattr(text_lib, "encode", fake_encode)
    monkeypatch.setattr(text_lib, "load_encoders", lambda request: "fail")
    folders = _fake_folders(tmp_path)
    path = tmp_path / "few.txt"
    path.write_text("a red circle\ntwo blue squares\na green cross\n")
    workdir = str(tmp_path / "work")
    config = _config("flux", folders, prompts=str(path), batch_size=1)
    with pytest.raises(KeyboardInterrupt):
        text_lib.run(config, workdir)
    assert sorted(os.listdir(workdir)) == [".embed_prompts.lock", "embed_prompts_progress.json"]
    progress = json.load(open(os.path.join(workdir, "embed_prompts_progress.json")))
    assert (progress["done"], progress["total"]) == (1, 4)
    os.makedirs(os.path.join(workdir, ".embeddings.partial-999"))  # a killed run's leftover

    monkeypatch.setattr(text_lib, "load_encoders", lambda request: "ok")
    final = text_lib.run(config, workdir)
    assert sorted(os.listdir(workdir)) == [".embed_prompts.lock", "embed_prompts_progress.json",
                                           "embeddings"]
    progress = json.load(open(os.path.join(workdir, "embed_prompts_progress.json")))
    assert (progress["done"], progress["total"]) == (4, 4)
    meta = text_lib.read_meta(workdir)
    assert meta["num_examples"] == {"train": 3, "test": 0, "empty": 1}   # round(0.1 * 3) = 0
    assert len(text_lib.load_embeddings(workdir, "test")) == 0
    train = text_lib.load_embeddings(final, "train")
    assert [p.text for p in train.prompts] == ["a red circle", "two blue squares", "a green cross"]
    np.testing.assert_array_equal(train.pooled[:, 0], [12, 16, 13])
    assert text_lib.null_condition(workdir)["text"].shape == (T5_LENGTH, 2)

    calls.clear()
    assert text_lib.run(config, workdir) == final and not calls   # done: nothing recomputed
    with pytest.raises(ConfigError, match="max_sequence_length"):
        text_lib.run(_config("flux", folders, prompts=str(path), max_sequence_length=8), workdir)
    with pytest.raises(ConfigError, match=r"config\.clip_g: .*no config\.json"):
        text_lib.run(_config("sd3", folders, clip_g=str(tmp_path / "nowhere")), workdir)
    with pytest.raises(ConfigError, match=r"config\.t5 is empty"):
        text_lib.run(_config("sd3", folders, t5=""), workdir)
    with pytest.raises(ConfigError, match=r"config\.t5_tokenizer: no tokenizer files"):
        text_lib.run(_config("sd3", folders, t5_tokenizer=str(tmp_path)), workdir)
    with pytest.raises(ConfigError, match="config.family"):
        text_lib.run(_config("sdxl", folders), workdir)
    with pytest.raises(ConfigError, match="config.prompts"):
        text_lib.run(_config("flux", folders, prompts="nowhere.txt"), workdir)
    with pytest.raises(FileNotFoundError, match="embed_prompts"):
        text_lib.load_embeddings(str(tmp_path), "train")


def test_embed_prompts_command_line_reports_a_missing_folder(tmp_path):
    """`python -m normguard_jax.main` dispatches to the job; a missing encoder folder is one
    line on stderr with exit code 1, before torch is imported."""
    command = [sys.executable, "-m", "normguard_jax.main", "--config=configs/embed_prompts.py",
               f"--config.clip_l={tmp_path}/none", f"--workdir={tmp_path}/work"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: config.clip_l: '{tmp_path}/none' is not a transformers model folder "
        "(no config.json there)")
