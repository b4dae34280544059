"""Cached prompt embeddings: the real text encoders run once, on the host, then never again.

The `embed_prompts` job (``python -m normguard_jax.main --config=configs/embed_prompts.py
--workdir=DIR``) reads a prompt set (`normguard_jax.data.prompts`: the `compositional` set or a
text file), runs the text encoders of the model family through `transformers` (PyTorch, CPU or
whatever torch picks) from local folders, and writes one record per prompt:

    text    float (L, D)   the sequence conditioning of the transformer (`encoder_hidden_states`)
    pooled  float (P,)     the pooled conditioning (`pooled_projections`)
    prompt  str, index int32, and the int metadata of `prompts.Prompt` (-1 = absent/unknown)

exactly as diffusers' pipelines build them (`StableDiffusion3Pipeline.encode_prompt`,
`FluxPipeline.encode_prompt`, `num_images_per_prompt=1`, no LoRA scale, no clip_skip):

  sd3   CLIP-L and CLIP-G (`CLIPTextModelWithProjection`), each on ids padded/truncated to the
        CLIP-L tokenizer's `model_max_length` (77), no attention mask: their penultimate hidden
        states are concatenated along features (768 + 1280), zero-padded to T5's width (4096)
        and concatenated along the sequence before T5's states (`T5EncoderModel` on ids padded/
        truncated to `max_sequence_length`, no mask): L = 77 + max_sequence_length, D = 4096.
        pooled = concat(CLIP-L text_embeds, CLIP-G text_embeds) (768 + 1280 = 2048).
  flux  text = T5 states (L = max_sequence_length, D = 4096); pooled = CLIP-L's
        `pooler_output` (`CLIPTextModel`, 768), no projection.

The dataset is TFDS (ArrayRecord) in `<workdir>/embeddings` with splits `train`, `test` and
`empty` (one record: the empty prompt "", the unconditional branch of classifier-free
guidance, encoded like the pipelines' default negative prompt). Read it without torch:

    train = load_embeddings(workdir, "train")    # PromptEmbeddings: .text (N, L, D), .pooled
    null = null_condition(workdir)               # {"text": (L, D), "pooled": (P,)}

Progress (prompts done of all, prompts/s, ETA) is logged after every batch and kept in
`<workdir>/embed_prompts_progress.json`. The job is atomic: it builds into
`<workdir>/.embeddings.partial-<pid>` and renames the finished dataset to
`<workdir>/embeddings`; a run that finds a finished dataset made from the same request does
nothing, one made from another request is refused. Leftover partial folders of interrupted
runs are removed. torch and transformers are imported only inside the functions
that encode (the training path never imports them; tests check it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any

import numpy as np
from absl import logging

from normguard_jax import file_lock
from normguard_jax.config_checks import ConfigError
from normguard_jax.data import prompts as prompts_lib

FAMILIES = ("sd3", "flux")
ENCODER_DTYPES = ("float32", "bfloat16", "float16")
STORE_DTYPES = ("float32", "float16")
SPLITS = ("train", "test", "empty")
DATASET_NAME = "prompt_embeddings"
VERSION = "1.0.0"
EMBEDDINGS_DIR = "embeddings"
META_FILE = "normguard_embeddings.json"
PROGRESS_FILE = "embed_prompts_progress.json"   # in the workdir: done/total, rate, ETA
# Encoders each family needs, and the diffusers pipeline subfolders of (encoder, tokenizer).
ENCODERS = {"sd3": ("clip_l", "clip_g", "t5"), "flux": ("clip_l", "t5")}
PIPELINE_FOLDERS = {
    "sd3": {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
            "t5": ("text_encoder_3", "tokenizer_3")},
    "flux": {"clip_l": ("text_encoder", "tokenizer"), "t5": ("text_encoder_2", "tokenizer_2")},
}


# --------------------------------------------------------------------------- the request.


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated embedding request (see configs/embed_prompts.py for every field)."""

    prompts: str
    test_fraction: float
    split_seed: int
    family: str
    encoders: dict[str, str]     # name -> encoder folder
    tokenizers: dict[str, str]   # name -> tokenizer folder
    max_sequence_length: int
    dtype: str
    store_dtype: str
    batch_size: int
    device: str

    def fingerprint(self) -> dict[str, Any]:
        """What the dataset depends on (paths made absolute, the prompt file's content hashed)."""
        record = dataclasses.asdict(self)
        del record["batch_size"], record["device"]  # change the numbers by float rounding only
        if os.path.isfile(self.prompts):
            with open(self.prompts, "rb") as handle:
                record["prompts_sha256"] = hashlib.sha256(handle.read()).hexdigest()
        return record


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in (
        "tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model"))


def request_from_config(config) -> Request:
    """Validates `config` (an embed_prompts config) without loading anything heavy.

    Raises:
      ConfigError: a bad value or a missing folder, naming the field.
    """
    family = str(config.family)
    if family not in FAMILIES:
        raise ConfigError(f"config.family must be one of {FAMILIES}, got {family!r}")
    for field, allowed in (("dtype", ENCODER_DTYPES), ("store_dtype", STORE_DTYPES)):
        if config[field] not in allowed:
            raise ConfigError(f"config.{field} must be one of {allowed}, got {config[field]!r}")
    if int(config.max_sequence_length) < 1:
        raise ConfigError(f"config.max_sequence_length must be >= 1, got "
                          f"{config.max_sequence_length}")
    if not str(config.device):
        raise ConfigError("config.device must name a torch device, e.g. 'cpu' or 'cuda'")
    if int(config.batch_size) < 1:
        raise ConfigError(f"config.batch_size must be >= 1, got {config.batch_size}")
    if not 0.0 <= float(config.test_fraction) < 1.0:
        raise ConfigError(f"config.test_fraction must be in [0, 1), got {config.test_fraction}")
    spec = str(config.prompts)
    if spec != "compositional" and not os.path.isfile(spec):
        raise ConfigError(f"config.prompts must be 'compositional' or an existing text file "
                          f"(one prompt per line), got {spec!r}")
    encoders, tokenizers = {}, {}
    for name in ENCODERS[family]:
        folder = str(config[name])
        tokenizer = str(config[name + "_tokenizer"])
        if config.pipeline_dir:
            model_sub, tokenizer_sub = PIPELINE_FOLDERS[family][name]
            folder = folder or os.path.join(config.pipeline_dir, model_sub)
            tokenizer = tokenizer or os.path.join(config.pipeline_dir, tokenizer_sub)
        tokenizer = tokenizer or folder
        if not folder:
            raise ConfigError(f"config.{name} is empty: family {family!r} needs the {name} "
                              f"encoder folder (or set config.pipeline_dir)")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ConfigError(f"config.{name}: {folder!r} is not a transformers model folder "
                              f"(no config.json there)")
        if not os.path.isdir(tokenizer) or not _has_tokenizer(tokenizer):
            raise ConfigError(f"config.{name}_tokenizer: no tokenizer files in {tokenizer!r} "
                              f"(the {name} tokenizer; empty = the encoder folder)")
        encoders[name] = os.path.abspath(folder)
        tokenizers[name] = os.path.abspath(tokenizer)
    return Request(prompts=os.path.abspath(spec) if spec != "compositional" else spec,
                   test_fraction=float(config.test_fraction), split_seed=int(config.split_seed),
                   family=family, encoders=encoders, tokenizers=tokenizers,
                   max_sequence_length=int(config.max_sequence_length), dtype=str(config.dtype),
                   store_dtype=str(config.store_dtype), batch_size=int(config.batch_size),
                   device=str(config.device))


# --------------------------------------------------------------------------- encoding (torch).


def load_encoders(request: Request) -> dict[str, tuple[Any, Any]]:
    """name -> (tokenizer, encoder module in eval mode), through transformers (imported here)."""
    import torch  # noqa: PLC0415 - only this job needs torch
    import transformers  # noqa: PLC0415

    dtype = getattr(torch, request.dtype)
    classes = {"clip_l": (transformers.CLIPTextModelWithProjection if request.family == "sd3"
                          else transformers.CLIPTextModel),
               "clip_g": transformers.CLIPTextModelWithProjection,
               "t5": transformers.T5EncoderModel}
    loaded = {}
    for name, folder in request.encoders.items():
        tokenizer = transformers.AutoTokenizer.from_pretrained(request.tokenizers[name])
        encoder = classes[name].from_pretrained(folder, dtype=dtype).to(request.device).eval()
        loaded[name] = (tokenizer, encoder)
    return loaded


def _warn_truncated(name: str, tokenizer, texts: list[str], max_length: int) -> None:
    lengths = [len(ids) for ids in tokenizer(texts, verbose=False).input_ids]
    cut = [t for t, n in zip(texts, lengths) if n > max_length]
    if cut:
        logging.warning("%s truncates %d prompt(s) to %d tokens, e.g. %r", name, len(cut),
                        max_length, cut[0])


def _clip(tokenizer, encoder, texts: list[str], max_length: int):
    """diffusers' SD3 `_get_clip_prompt_embeds`: (penultimate hidden states, pooled output)."""
    _warn_truncated("CLIP", tokenizer, texts, max_length)
    ids = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    out = encoder(ids.to(encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def _t5(tokenizer, encoder, texts: list[str], max_length: int):
    """diffusers' `_get_t5_prompt_embeds`: the last hidden states, no attention mask."""
    _warn_truncated("T5", tokenizer, texts, max_length)
    ids = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    return encoder(ids.to(encoder.device))[0]


def encode(encoders: dict[str, tuple[Any, Any]], family: str, texts: list[str],
           max_sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Encodes a batch of prompts as the family's diffusers pipeline does.

    Args:
      encoders: from `load_encoders`.
      family: "sd3" | "flux".
      texts: B prompts.
      max_sequence_length: T5's padded length.

    Returns:
      float32 `(text (B, L, D), pooled (B, P))` (see the module docstring for L, D, P).
    """
    import torch  # noqa: PLC0415

    with torch.inference_mode():
        t5_tokenizer, t5_encoder = encoders["t5"]
        l_tokenizer, l_encoder = encoders["clip_l"]
        clip_length = l_tokenizer.model_max_length  # diffusers' tokenizer_max_length, both CLIPs
        t5_states = _t5(t5_tokenizer, t5_encoder, texts, max_sequence_length).to(t5_encoder.dtype)
        if family == "flux":
            _warn_truncated("CLIP", l_tokenizer, texts, clip_length)
            ids = l_tokenizer(texts, padding="max_length", max_length=clip_length,
                              truncation=True, return_tensors="pt").input_ids
            pooled = l_encoder(ids.to(l_encoder.device),
                               output_hidden_states=False).pooler_output.to(l_encoder.dtype)
            text = t5_states
        elif family == "sd3":
            l_states, l_pooled = _clip(l_tokenizer, l_encoder, texts, clip_length)
            g_tokenizer, g_encoder = encoders["clip_g"]
            g_states, g_pooled = _clip(g_tokenizer, g_encoder, texts, clip_length)
            clip_states = torch.cat([l_states.to(l_encoder.dtype), g_states.to(l_encoder.dtype)],
                                    dim=-1)
            clip_states = torch.nn.functional.pad(
                clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
            text = torch.cat([clip_states, t5_states], dim=-2)
            pooled = torch.cat([l_pooled, g_pooled], dim=-1)
        else:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        return text.float().cpu().numpy(), pooled.float().cpu().numpy()


# --------------------------------------------------------------------------- the job.


def _features(text_shape, pooled_shape, store_dtype: str):
    import tensorflow_datasets as tfds  # noqa: PLC0415

    dtype = np.dtype(store_dtype)
    features = {"text": tfds.features.Tensor(shape=tuple(text_shape), dtype=dtype),
                "pooled": tfds.features.Tensor(shape=tuple(pooled_shape), dtype=dtype),
                "prompt": tfds.features.Text(), "index": tfds.features.Scalar(np.int32)}
    features.update({name: tfds.features.Scalar(np.int32)
                     for name in prompts_lib.METADATA_FIELDS})
    return tfds.features.FeaturesDict(features)


def _records(split: str, prompts, encode_batch, batch_size: int, store_dtype: str,
             progress: dict):
    """Yields (key, example) for TFDS, encoding `batch_size` prompts at a time, logging progress."""
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        text, pooled = encode_batch([p.text for p in chunk])
        for offset, prompt in enumerate(chunk):
            index = start + offset
            yield index, {"text": text[offset].astype(store_dtype),
                          "pooled": pooled[offset].astype(store_dtype), "prompt": prompt.text,
                          "index": index, **prompt.metadata()}
        progress["done"] += len(chunk)
        elapsed = time.time() - progress["start"]
        rate = progress["done"] / max(elapsed, 1e-9)
        eta = (progress["total"] - progress["done"]) / rate
        logging.info("embed_prompts: %s %d/%d, all %d/%d prompts (%.2f prompts/s, ETA %.0f s)",
                     split, start + len(chunk), len(prompts), progress["done"],
                     progress["total"], rate, eta)
        with open(progress["path"] + ".tmp", "w") as handle:
            json.dump({"split": split, "done": progress["done"], "total": progress["total"],
                       "prompts_per_s": rate, "eta_s": eta}, handle)
        os.replace(progress["path"] + ".tmp", progress["path"])


def embeddings_dir(path: str | os.PathLike) -> str:
    """The dataset folder: `path` itself if it holds one, else `<path>/embeddings`."""
    path = os.fspath(path)
    return path if os.path.isfile(os.path.join(path, META_FILE)) else os.path.join(
        path, EMBEDDINGS_DIR)


def run(config, workdir: str) -> str:
    """The `embed_prompts` job: encodes the prompt set once into `<workdir>/embeddings`.

    Returns:
      The dataset folder.

    Raises:
      ConfigError: an invalid field, a missing folder, or a finished dataset in `workdir`
        made from another request.
    """
    request = request_from_config(config)
    if not workdir:
        raise ConfigError("--workdir is required")
    os.makedirs(workdir, exist_ok=True)
    final = os.path.join(workdir, EMBEDDINGS_DIR)
    fingerprint = json.loads(json.dumps(request.fingerprint()))
    with file_lock.exclusive(os.path.join(workdir, ".embed_prompts.lock")):
        if os.path.isdir(final):
            done = read_meta(final)
            if done["request"] == fingerprint:
                logging.info("embed_prompts: %s is already complete; nothing to do", final)
                return final
            changed = sorted(k for k in set(done["request"]) | set(fingerprint)
                             if done["request"].get(k) != fingerprint.get(k))
            raise ConfigError(f"{final} holds embeddings of another request (fields "
                              f"{', '.join(changed)} differ); use another --workdir or delete it")
        for name in os.listdir(workdir):  # leftovers of interrupted runs
            if name.startswith(".embeddings.partial-"):
                shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
        partial = os.path.join(workdir, f".embeddings.partial-{os.getpid()}")
        try:
            _build(request, partial, fingerprint, os.path.join(workdir, PROGRESS_FILE))
            built = os.path.join(partial, DATASET_NAME, request.family, VERSION)
            os.rename(built, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    logging.info("embed_prompts: wrote %s", final)
    return final


def _builder_class():
    """A TFDS builder of records generated elsewhere (like `tfds.dataset_builders.AdhocBuilder`,
    whose `tf.data.Dataset` type check would import TensorFlow: seconds for nothing)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    class PromptEmbeddingsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = DATASET_NAME
        VERSION = tfds.core.Version(VERSION)
        RELEASE_NOTES = {str(VERSION): "Prompt embeddings (text, pooled) with prompt metadata."}

        def __init__(self, *, features, split_records, config: str, **kwargs):
            config = tfds.core.BuilderConfig(name=config, version=str(self.VERSION))
            self.BUILDER_CONFIGS = [config]  # noqa: N806 - as AdhocBuilder does
            self._features = features
            self._split_records = split_records
            super().__init__(config=config, **kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                         features=self._features, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            del dl_manager
            return dict(self._split_records)

        def _generate_examples(self, **kwargs):
            raise NotImplementedError  # the records come from _split_generators

    return PromptEmbeddingsBuilder


def _build(request: Request, data_dir: str, fingerprint: dict, progress_path: str) -> None:
    prompt_set = prompts_lib.load_prompt_set(request.prompts, request.test_fraction,
                                             request.split_seed)
    splits = {"train": prompt_set.train, "test": prompt_set.test,
              "empty": (prompts_lib.Prompt(text=""),)}
    logging.info("embed_prompts: %d train, %d test prompts of %r; loading %s encoders from %s",
                 len(prompt_set.train), len(prompt_set.test), prompt_set.name, request.family,
                 request.encoders)
    encoders = load_encoders(request)

    def encode_batch(texts):
        return encode(encoders, request.family, texts, request.max_sequence_length)

    text, pooled = encode_batch([""])  # the shapes, and the empty prompt
    progress = {"done": 0, "total": sum(len(p) for p in splits.values()), "start": time.time(),
                "path": progress_path}
    # TFDS refuses empty splits: a split without prompts (e.g. test_fraction=0) is left out
    # of the files and read back as empty (meta["num_examples"] records it).
    split_records = {split: _records(split, prompts, encode_batch, request.batch_size,
                                     request.store_dtype, progress)
                     for split, prompts in splits.items() if prompts}
    builder = _builder_class()(
        features=_features(text.shape[1:], pooled.shape[1:], request.store_dtype),
        split_records=split_records, config=request.family, data_dir=data_dir,
        file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    meta = {"request": fingerprint, "prompt_set": prompt_set.name, "family": request.family,
            "text_shape": list(text.shape[1:]), "pooled_shape": list(pooled.shape[1:]),
            "store_dtype": request.store_dtype,
            "num_examples": {split: len(p) for split, p in splits.items()}}
    version_dir = os.path.join(data_dir, DATASET_NAME, request.family, VERSION)
    with open(os.path.join(version_dir, META_FILE), "w") as handle:
        json.dump(meta, handle, indent=1)


# --------------------------------------------------------------------------- reading (no torch).


def read_meta(path: str | os.PathLike) -> dict:
    """The job's record of a finished dataset (request, shapes, example counts)."""
    meta_path = os.path.join(embeddings_dir(path), META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"no finished prompt embeddings at {os.fspath(path)!r} "
                                f"(run the embed_prompts job first)")
    with open(meta_path) as handle:
        return json.load(handle)


def embeddings_source(path: str | os.PathLike, split: str):
    """A random-access TFDS data source over one split (records as dicts of numpy arrays)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    read_meta(path)  # a clear error when the job has not finished
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    builder = tfds.builder_from_directory(embeddings_dir(path))
    return builder.as_data_source(split=split)


@dataclasses.dataclass(frozen=True, eq=False)
class PromptEmbeddings:
    """One split in memory, in prompt order.

    Attributes:
      prompts: the N `Prompt`s (text and metadata).
      text: float32 (N, L, D).
      pooled: float32 (N, P).
    """

    prompts: tuple[prompts_lib.Prompt, ...]
    text: np.ndarray
    pooled: np.ndarray

    def __len__(self) -> int:
        return len(self.prompts)

    def condition(self, indices) -> dict[str, np.ndarray]:
        """The conditioning pytree `{"text": (B, L, D), "pooled": (B, P)}` of prompts `indices`."""
        indices = np.asarray(indices)
        return {"text": self.text[indices], "pooled": self.pooled[indices]}


def load_embeddings(path: str | os.PathLike, split: str) -> PromptEmbeddings:
    """Reads a whole split (`train`, `test` or `empty`) into memory as float32."""
    meta = read_meta(path)
    records = []
    if meta["num_examples"].get(split):
        source = embeddings_source(path, split)
        records = sorted(source.__getitems__(range(len(source))), key=lambda r: int(r["index"]))
    prompts = tuple(prompts_lib.Prompt(
        text=_as_str(r["prompt"]),
        **{name: int(r[name]) for name in prompts_lib.METADATA_FIELDS}) for r in records)
    text = np.zeros([0] + meta["text_shape"], np.float32)
    pooled = np.zeros([0] + meta["pooled_shape"], np.float32)
    if records:
        text = np.stack([np.asarray(r["text"], np.float32) for r in records])
        pooled = np.stack([np.asarray(r["pooled"], np.float32) for r in records])
    return PromptEmbeddings(prompts=prompts, text=text, pooled=pooled)


def _as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def null_condition(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The empty prompt's `{"text": (L, D), "pooled": (P,)}`: CFG's unconditional branch."""
    empty = load_embeddings(path, "empty")
    return {"text": empty.text[0], "pooled": empty.pooled[0]}
