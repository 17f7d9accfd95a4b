"""Prompt cleaning and encode_prompt against diffusers' WanPipeline on the same tiny weights."""

import torch

from wan_rt.models.text_encoder import TextEncoder, clean_prompt, load_tokenizer, tokenize


def test_clean_prompt():
    assert clean_prompt("  a   cat\n\tsits  ") == "a cat sits"
    assert clean_prompt("salt &amp;amp; pepper") == "salt & pepper"  # unescaped twice
    assert clean_prompt("cafÃ©") == "café"  # ftfy repairs mojibake


def test_encode_prompt_matches_diffusers(diffusers_checkpoint):
    from diffusers import WanPipeline
    from transformers import UMT5EncoderModel

    folder = diffusers_checkpoint("tiny-t2v-A14B")
    tokenizer = load_tokenizer(folder / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder").eval()
    ref_pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=None, vae=None, scheduler=None)
    prompts = ["a cat walking on the beach at sunset", "  dragon &amp; knight   in the   snow "]
    ids, mask = tokenize(tokenizer, prompts, max_sequence_length=24)
    assert mask[0].sum() < mask.shape[1], "prompt should be shorter than max length so padding is tested"
    with torch.no_grad():
        ours = TextEncoder(encoder)(ids, mask)
        ref = ref_pipe._get_t5_prompt_embeds(prompts, max_sequence_length=24, device=torch.device("cpu"))
    assert ours.shape == ref.shape == (2, 24, encoder.config.d_model)
    assert float((ours - ref).abs().max()) / float(ref.abs().max()) < 1e-5
    # Rows past each prompt's true length are exact zeros (Wan's trim-then-pad).
    for row, n in zip(ours, mask.sum(1)):
        assert torch.count_nonzero(row[n:]) == 0 and torch.count_nonzero(row[:n]) > 0
