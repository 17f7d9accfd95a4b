"""Prompt cleaning, the tiny presets' tokenizer against sentencepiece itself, and encode_prompt
against diffusers' WanPipeline on the same tiny weights."""

import warnings

import pytest
import torch

from wan_rt.models.text_encoder import (DEGENERATE_RATIO, TextEncoder, check_tokenizer, clean_prompt, load_tokenizer,
                                       tokenize)

# Same word count, different words: a tokenizer that maps every word to one id gives both the same ids.
PROMPTS = ["a cat walking on the beach at sunset", "  dragon &amp; knight   in the   snow at night "]


def test_clean_prompt():
    assert clean_prompt("  a   cat\n\tsits  ") == "a cat sits"
    assert clean_prompt("salt &amp;amp; pepper") == "salt & pepper"  # unescaped twice
    assert clean_prompt("cafÃ©") == "café"  # ftfy repairs mojibake


def test_tiny_preset_tokenizer_gives_sentencepiece_ids(prompt_ids_check):
    from wan_rt.tiny import ensure_tiny_checkpoint

    folder = ensure_tiny_checkpoint("tiny-t2v-A14B") / "tokenizer"
    tokenizer = load_tokenizer(folder)
    prompts = [*PROMPTS, "a red fox running through fresh snow at sunrise, cinematic, detailed", "café 4k"]
    ids = prompt_ids_check(tokenizer, folder / "spiece.model", prompts, 40)
    assert len(tokenizer) > 100 and len(set(ids.flatten().tolist())) > 20


def test_degenerate_tokenizer_warns_in_one_line(tmp_path):
    import shutil

    from transformers import T5Tokenizer

    from wan_rt.config import get_spec
    from wan_rt.tiny import ensure_tiny_checkpoint

    spm_file = ensure_tiny_checkpoint("tiny-t2v-A14B") / "tokenizer" / "spiece.model"
    vocab = get_spec("tiny-t2v-A14B").text_encoder.vocab_size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_tokenizer(load_tokenizer(spm_file.parent, vocab), vocab, "tiny-t2v-A14B")
    # The construction transformers 5 gets wrong (what the tiny presets used to save).
    shutil.copy(spm_file, tmp_path / "spiece.model")
    broken = T5Tokenizer(vocab_file=str(tmp_path / "spiece.model"), extra_ids=0)
    if len(broken) * DEGENERATE_RATIO >= vocab:
        pytest.skip(f"this transformers builds T5Tokenizer(vocab_file=...) faithfully ({len(broken)} tokens)")
    with pytest.warns(UserWarning, match=r"^ckpt/tokenizer: the tokenizer has \d+ tokens for a text encoder with "
                                         f"{vocab} embeddings") as caught:
        assert not check_tokenizer(broken, vocab, "ckpt/tokenizer")
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    # Loading such a tokenizer with the encoder's vocabulary size warns the same way.
    broken.save_pretrained(tmp_path / "saved")
    with pytest.warns(UserWarning, match=f"^{tmp_path / 'saved'}: the tokenizer has"):
        load_tokenizer(tmp_path / "saved", vocab)


def test_encode_prompt_matches_diffusers(diffusers_checkpoint, prompt_ids_check):
    from diffusers import WanPipeline
    from transformers import UMT5EncoderModel

    folder = diffusers_checkpoint("tiny-t2v-A14B")
    tokenizer = load_tokenizer(folder / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder").eval()
    ref_pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=None, vae=None, scheduler=None)
    prompts = PROMPTS
    ids, mask = tokenize(tokenizer, prompts, max_sequence_length=24)
    # Both sides share this tokenizer: hold it to its source (and the two prompts to different ids).
    prompt_ids_check(tokenizer, folder.parent / "_tok" / "spiece.model", prompts, 24)
    assert mask[0].sum() < mask.shape[1], "prompt should be shorter than max length so padding is tested"
    with torch.no_grad():
        ours = TextEncoder(encoder)(ids, mask)
        ref = ref_pipe._get_t5_prompt_embeds(prompts, max_sequence_length=24, device=torch.device("cpu"))
    assert ours.shape == ref.shape == (2, 24, encoder.config.d_model)
    assert float((ours - ref).abs().max()) / float(ref.abs().max()) < 1e-5
    # Rows past each prompt's true length are exact zeros (Wan's trim-then-pad).
    for row, n in zip(ours, mask.sum(1)):
        assert torch.count_nonzero(row[n:]) == 0 and torch.count_nonzero(row[:n]) > 0
