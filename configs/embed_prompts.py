"""Encode a prompt set once with the real text encoders; the RL loop reads the cached embeddings.

Run (from the repository root) with the text encoders of a local SD3 / SD3.5 snapshot:
  python -m normguard_jax.main --config=configs/embed_prompts.py \
      --config.pipeline_dir=/models/stable-diffusion-3.5-medium --workdir=workdir/prompts_sd3
or of FLUX (T5 length 512 for FLUX.1-dev, 256 for schnell):
  python -m normguard_jax.main --config=configs/embed_prompts.py:flux \
      --config.pipeline_dir=/models/FLUX.1-dev --config.max_sequence_length=512 \
      --workdir=workdir/prompts_flux
Single folders instead of a snapshot: --config.clip_l=DIR --config.clip_g=DIR --config.t5=DIR
(each a transformers model folder; its tokenizer in the same folder or in <name>_tokenizer).
Writes <workdir>/embeddings (TFDS, splits train / test / empty); with the defaults, SD3 gives
text (333, 4096) and pooled (2048,) per prompt, FLUX text (512, 4096) and pooled (768,).
Needs torch and transformers (this job only); a second run with the same config does nothing.
"""

import ml_collections


def get_config(family: str = "sd3"):
    c = ml_collections.ConfigDict()
    c.job = "embed_prompts"     # which run() main.py dispatches to.
    c.family = family           # text encoders and their combination: "sd3" | "flux".
    c.prompts = "compositional"  # prompt set: "compositional" (ours) or a text file, one per line.
    c.test_fraction = 0.1       # a text file's held-out share (the compositional split is fixed).
    c.split_seed = 0            # seed of a text file's train/test split (a hash, not an RNG).
    c.pipeline_dir = ""         # optional diffusers snapshot root: fills the folders left empty
                                # below from its text_encoder*/tokenizer* subfolders.
    c.clip_l = ""               # CLIP-L encoder folder (sd3: CLIPTextModelWithProjection,
                                # flux: CLIPTextModel).
    c.clip_l_tokenizer = ""     # CLIP-L tokenizer folder; "" = the encoder folder.
    c.clip_g = ""               # CLIP-G encoder folder (sd3 only; CLIPTextModelWithProjection).
    c.clip_g_tokenizer = ""     # CLIP-G tokenizer folder; "" = the encoder folder.
    c.t5 = ""                   # T5 encoder folder (T5EncoderModel).
    c.t5_tokenizer = ""         # T5 tokenizer folder; "" = the encoder folder.
    c.max_sequence_length = 256  # T5 tokens (padded/truncated): diffusers' default is 256 for
                                 # SD3 and FLUX.1-schnell, 512 for FLUX.1-dev.
    c.dtype = "float32"         # encoder compute dtype: "float32" | "bfloat16" | "float16".
    c.store_dtype = "float32"   # stored embedding dtype: "float32" | "float16" (half the disk).
    c.batch_size = 8            # prompts per encoder call.
    c.device = "cpu"            # torch device of the encoders: "cpu", "cuda", "cuda:1", ...
    return c
